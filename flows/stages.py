"""One Prefect task for every stage, plus the artifacts each stage publishes.

The task body is nanopipe.runner.run_stage: it is the same code that `python -m nanopipe stage`
runs without Prefect. Prefect adds the cache (StoreKeyPolicy), retries, logs and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.concurrency.sync import concurrency
from prefect.filesystems import WritableFileSystem

from nanopipe.config import RunConfig
from nanopipe.progress import fmt_eta
from nanopipe.report import artifact_markdown
from nanopipe.runner import run_stage, stage_module
from nanopipe.store import Store
from flows.cache import StoreKeyPolicy

# Result tables a stage commits, published as "<stage>-table" artifacts: file -> rows inside it.
RESULT_TABLES = {"core.json": lambda d: d["tasks"], "chat_eval.json": lambda d: d, "rl_eval.json": lambda d: d}

# Stages that read remote sources: their failures may be transient network errors.
_NETWORK_STAGES = {"tokenizer", "data"}
_TRANSIENT = (ConnectionError, TimeoutError)


def artifact_key(stage: str, kind: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes; grouped by stage."""
    return f"{stage.replace('_', '-')}-{kind}"


def publish_artifacts(store: Store, manifest: dict) -> None:
    """<stage>-metrics (table), <stage>-store (link to its dir), <stage>-summary (markdown; the report itself
    for `report`), and <stage>-table for stages that commit a result table (CORE tasks, chat evals, pass@k)."""
    stage, metrics = manifest["stage"], manifest["metrics"]
    url = store.url_of(store.stage_dir(stage, manifest["key"]))
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, (dict, list))]
    create_table_artifact(key=artifact_key(stage, "metrics"), table=rows or [{"metric": "-", "value": "-"}],
                          description=f"{stage} metrics ({manifest['key'][:16]})")
    create_link_artifact(key=artifact_key(stage, "store"), link=url if "://" in url else f"file://{url}",
                         link_text=f"{stage}/{manifest['key'][:16]}")
    for f in manifest["files"]:
        if f["path"] in RESULT_TABLES:
            rows = RESULT_TABLES[f["path"]](json.loads(store.read_bytes(manifest, f["path"])))
            create_table_artifact(key=artifact_key(stage, "table"), table=rows, description=f"{stage}: {f['path']}")
    if any(f["path"] == "report.md" for f in manifest["files"]):
        create_markdown_artifact(key=artifact_key(stage, "summary"), markdown=artifact_markdown(store, manifest),
                                 description="nanopipe report")
        return
    files = "\n".join(f"| `{f['path']}` | {f['bytes']:,} | `{f['sha256'][:12]}` |" for f in manifest["files"][:50])
    ups = ", ".join(f"{k} `{v['key'][:16]}`" for k, v in manifest["upstream"].items()) or "none"
    create_markdown_artifact(
        key=artifact_key(stage, "summary"),
        markdown=(f"# {stage} `{manifest['key'][:16]}`\n\nbuilt {manifest['created_at']} on "
                  f"{manifest['host']['hostname']} in {manifest['timings']['seconds']:.1f}s; upstream: {ups}\n\n"
                  f"store: `{url}`\n\n| file | bytes | sha256 |\n|---|---|---|\n{files}\n"),
        description=f"{stage} summary",
    )


# Live artifacts of a running stage: updated in place at most this often (the last event always).
LIVE_EVERY_S = 3.0
LIVE_ROWS = 10  # the newest reported steps in the <stage>-live table
LIVE_COLUMNS = ("loss", "val_bpb", "val_loss", "tokens_per_s", "mfu")  # first, when present; then the rest


class LiveArtifacts:
    """A running stage's progress events (nanopipe.progress) as two artifacts of its task run,
    created on the first event and then updated in place: <stage>-progress (percent; step, ETA and
    the latest metrics in its description) and <stage>-live (a table of the newest steps' metrics).
    A failed update is a warning, never the stage's failure: watching must not stop the training."""

    def __init__(self, stage: str, logger, every_s: float = LIVE_EVERY_S):
        self.stage, self.logger, self.every_s = stage, logger, every_s
        self.progress_id = self.table_id = None
        self.rows: list[dict] = []
        self.last_event: dict | None = None
        self.published = -float("inf")
        self.failed = False

    def __call__(self, event: dict) -> None:
        self.last_event = event
        row = {"step": event["step"], **event["metrics"]}
        self.rows = [row] + [r for r in self.rows if r["step"] != row["step"]][:LIVE_ROWS - 1]
        now = time.monotonic()
        if event["percent"] >= 100 or now - self.published >= self.every_s:
            self.published = now
            self._publish(event)

    def finish(self) -> None:
        """The stage committed: 100%, whatever the last event said (a run resumed at its end may send none)."""
        if self.last_event is not None and self.last_event["percent"] < 100:
            self._publish({**self.last_event, "step": self.last_event["total"], "percent": 100.0, "eta_s": 0.0})

    def _publish(self, event: dict) -> None:
        try:
            text = describe_progress(event)
            if self.progress_id is None:
                self.progress_id = create_progress_artifact(event["percent"], key=artifact_key(self.stage, "progress"),
                                                            description=text)
            else:
                update_progress_artifact(self.progress_id, event["percent"], description=text)
            table = [{k: _cell(r.get(k)) for k in _columns(self.rows)} for r in self.rows]
            description = f"{self.stage}: the newest steps' metrics ({event['key'][:16]})"
            if self.table_id is None:
                self.table_id = create_table_artifact(table, key=artifact_key(self.stage, "live"), description=description)
            else:
                with get_client(sync_client=True) as client:
                    client.update_artifact(self.table_id, ArtifactUpdate(data=json.dumps(table), description=description))
        except Exception as e:  # the Prefect API is down or refuses: say so once, keep training
            if not self.failed:
                self.failed = True
                self.logger.warning(f"[{self.stage}] live progress artifacts not updated: {type(e).__name__}: {e}")


def describe_progress(event: dict) -> str:
    """One line for the progress artifact: step, ETA, elapsed, the latest metrics."""
    m = event["metrics"]
    shown = [f"{k} {_fmt(m[k])}" for k in _columns([m]) if m[k] is not None]
    phase = f" ({event['phase']})" if event.get("phase") else ""
    return (f"{event['stage']} step {event['step']}/{event['total']}{phase} · ETA {fmt_eta(event['eta_s'])} · "
            f"elapsed {fmt_eta(event['elapsed_s'])}" + "".join(f" · {s}" for s in shown))


def _columns(rows: list[dict]) -> list[str]:
    keys = [k for r in rows for k in r]
    return [k for k in ("step", *LIVE_COLUMNS) if k in keys] + sorted(set(keys) - {"step", *LIVE_COLUMNS})


def _cell(v):
    return round(v, 4) if isinstance(v, float) else ("" if v is None else v)


def _fmt(v) -> str:
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def _transient(task, task_run, state) -> bool:
    try:
        state.result()
    except _TRANSIENT:
        return True
    except Exception:
        return False
    return False


# One torchrun stage at a time in this process: the pipeline's tasks share one machine, and two
# training/eval stages at once (base_eval beside mid_train) would fight over its GPUs or, on CPU,
# oversubscribe its cores (each rank takes cores / ranks threads): 10x slower there, not faster.
_DEVICES = threading.Lock()


@contextlib.contextmanager
def device_slot(stage: str) -> Iterator[None]:
    """Held while a torchrun stage runs: this process's device lock and a slot of the global
    "gpu" concurrency limit (across workers; a no-op where that limit does not exist)."""
    if getattr(stage_module(stage), "LAUNCH", None) != "torchrun":
        yield
        return
    with _DEVICES, concurrency("gpu", occupy=1):
        yield


@task(cache_policy=StoreKeyPolicy(), persist_result=True, result_serializer="json",
      task_run_name="{stage}", retries=0)
def stage_task(stage: str, config: dict, upstream: dict[str, dict], store_url: str, force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    store = Store(store_url)
    cfg = RunConfig.model_validate(config)
    live = LiveArtifacts(stage, logger)
    with device_slot(stage):
        manifest, reused = run_stage(store, cfg, stage, upstream, force=force, log=logger.info, on_progress=live)
    if not reused:
        live.finish()
        publish_artifacts(store, manifest)
    return manifest


def configured_task(stage: str, storage: WritableFileSystem):
    """The stage task bound to the store's result storage, with retries for network stages."""
    opts: dict[str, Any] = {"result_storage": storage}
    if stage in _NETWORK_STAGES:
        opts.update(retries=int(os.environ.get("NANOPIPE_RETRIES", 2)), retry_delay_seconds=[5, 30],
                    retry_condition_fn=_transient)
    return stage_task.with_options(**opts)
