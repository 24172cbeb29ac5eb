"""How far a running torchrun stage is, for whoever watches it while it runs.

Rank 0 of the stage reports events: each one is written atomically to a small JSON file in the
stage's _work/ dir (``Store.progress_path``; `nanopipe status` reads it, and it goes with _work/
when the stage commits) and handed to the stage's ``on_progress`` callback. In a torchrun child
that callback prints it as one marker line, which the parent (``runner.launch_child``) takes out
of the log and hands to its own caller: flows/ turns events into Prefect artifacts. An event::

    {"stage", "key", "step", "total", "percent", "eta_s", "elapsed_s",
     "metrics": {"loss", "val_bpb" | "val_loss", "tokens_per_s", "mfu", ...}, "updated_at"}

(plus "phase" where a stage's work has named parts). No Prefect here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import posixpath
import time
from typing import TYPE_CHECKING, Callable

from nanopipe.store import Store, StoreError, writing

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

MARK = "@@progress "  # starts a child's progress line (never a line of its log)
EVERY_S = 5.0  # at most one event per this many seconds, besides forced ones (start, evaluations, log lines, end)

OnProgress = Callable[[dict], None]


def fmt_eta(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def progress_line(event: dict) -> str:
    """The marker line a torchrun child prints for an event."""
    return MARK + json.dumps(event, separators=(",", ":"))


def print_progress(event: dict) -> None:
    """on_progress of a torchrun child's rank 0: the event, as a line its parent parses."""
    print(progress_line(event), flush=True)


def parse_progress(line: str) -> dict | None:
    """The event of a child's progress line; None for any other line (and for a damaged marker line)."""
    if not line.startswith(MARK):
        return None
    try:
        event = json.loads(line[len(MARK):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def read_progress(store: Store, stage: str, key: str) -> dict | None:
    """The latest event of a running stage; None when it reports none (not started, not a torchrun
    stage, or committed: the file goes with _work/)."""
    try:
        return json.loads(store.fs.cat_file(store.progress_path(stage, key)))
    except (FileNotFoundError, ValueError):
        return None


def numbers(name: str, value) -> dict[str, float]:
    """The live metrics of an evaluation result: a number as itself, the rates (floats) of a dict."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: value}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, float)}
    return {}


class StageProgress:
    """The progress of one stage run out of `total` units (training steps, evaluation phases).

    Only rank 0 reports; on other ranks every call does nothing. update() reports at most once
    per `every_s` seconds unless forced; the ETA, unless given, is the elapsed time per unit done
    times the units left. Elapsed time counts from this object's creation (this attempt).
    Progress is for watching: a progress file that cannot be written (a full disk) is said once in
    the stage's log and never stops the work (its checkpoints meet the same disk and say so)."""

    def __init__(self, ctx: "StageContext", total: int, every_s: float = EVERY_S):
        self.store, self.stage, self.key, self.total = ctx.store, ctx.stage, ctx.key, max(total, 1)
        self.active, self.on_progress, self.every_s = ctx.rank == 0, ctx.on_progress, every_s
        self.log, self.file_failed = ctx.log, False
        self.started, self.reported = time.time(), -math.inf
        self.metrics: dict = {}

    def update(self, step: int, metrics: dict | None = None, eta_s: float | None = None, force: bool = False,
               phase: str | None = None) -> dict | None:
        """Record `metrics` (merged into the latest values) and report if due; returns the event reported."""
        if not self.active:
            return None
        self.metrics.update(metrics or {})
        now = time.time()
        if not force and now - self.reported < self.every_s:
            return None
        self.reported = now
        elapsed = now - self.started
        if eta_s is None:
            eta_s = elapsed / step * (self.total - step) if step > 0 else None
        event = {"stage": self.stage, "key": self.key, "step": step, "total": self.total,
                 "percent": round(100.0 * min(step, self.total) / self.total, 2),
                 "eta_s": None if eta_s is None else round(eta_s, 1), "elapsed_s": round(elapsed, 1),
                 "metrics": {k: _finite(v) for k, v in self.metrics.items()},
                 "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if phase is not None:
            event["phase"] = phase
        self._write(event)
        if self.on_progress is not None:
            self.on_progress(event)
        return event


    def _write(self, event: dict) -> None:
        path = self.store.progress_path(self.stage, self.key)
        try:
            with writing(self.store.url_of(path)):  # a stage run in this process may not have made _work/ yet
                self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self.store.atomic_put(path, json.dumps(event).encode())
        except (StoreError, OSError) as e:
            if not self.file_failed:
                self.file_failed = True
                self.log(f"[{self.stage}] progress file not written (the stage goes on): {e}")


def _finite(v):
    """JSON has no NaN or infinity: such a value (a diverged loss) reads as null."""
    return v if not isinstance(v, float) or math.isfinite(v) else None
