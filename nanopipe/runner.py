"""The stage contract, without Prefect: compute a stage's key, reuse it if committed, else run and commit.

A stage is a module in ``nanopipe/stages`` with::

    VERSION: int              bump to invalidate every cached output of the stage
    run(ctx) -> dict           does the work, writes through ctx.writer, returns metrics
    LAUNCH = "torchrun"        (optional) run() happens in a torchrun child; see launch_child
    prepare(section)           (optional, torchrun stages) one-time work in the parent, e.g. downloads

The upstream stages each stage reads are listed in ``nanopipe.stages.STAGES``. The code a stage's
key covers is found from its imports (``nanopipe.codeid``): nothing to list by hand.
Flows call ``run_stage`` inside a Prefect task; ``python -m nanopipe stage NAME`` calls it directly.

One run of a stage key at a time: the process that runs it holds ``Store.lock_path`` (flock) and
each rank of its torchrun child holds ``Store.rank_lock_path``; a second run waits for both,
saying what it waits for, then reuses what the first committed (``stage_lock``). The lock files
are local: on a remote store they order the runs of one host (another host's run of the same key
shows in its progress file; the `gpu` concurrency limit keeps deployments apart).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Callable

from pydantic import BaseModel

from nanopipe.codeid import stage_code
from nanopipe.config import ConfigError, RunConfig, TrackingConfig
from nanopipe.faults import reset_faults
from nanopipe.launch import LaunchError, die_with_parent, run_streaming, torchrun_command, training_env
from nanopipe.progress import OnProgress, parse_progress, print_progress, read_progress
from nanopipe.sizing import SizingError
from nanopipe.stages import STAGES
from nanopipe.store import Store, StageWriter, StoreError, output_digest, stage_key, writing
from nanopipe.why import why

Log = Callable[[str], None]


class StageError(RuntimeError):
    pass


@dataclass
class StageContext:
    store: Store
    stage: str
    key: str
    config: BaseModel
    upstream: dict[str, dict]
    writer: StageWriter
    log: Log = print
    rank: int = 0
    world_size: int = 1
    extra: dict = field(default_factory=dict)
    on_progress: OnProgress | None = None  # receives the stage's progress events (nanopipe.progress)
    tracking: TrackingConfig | None = None  # where training also logs its metrics (nanopipe.tracking)

    def upstream_file(self, stage: str, rel: str) -> str:
        """Verified local path of an upstream stage's committed file."""
        return self.store.local_path(self.upstream[stage], rel)

    def upstream_bytes(self, stage: str, rel: str) -> bytes:
        return self.store.read_bytes(self.upstream[stage], rel)


def stage_module(name: str):
    _check_stage(name)
    return importlib.import_module(f"nanopipe.stages.{name}")


def _check_stage(name: str) -> None:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")


def code_version(name: str) -> str:
    """The stage's VERSION plus a digest over the normal form of the stage module and every nanopipe
    module it imports, transitively (nanopipe.codeid); read from the source, once per process."""
    _check_stage(name)
    return stage_code(name)["code_version"]


def compute_key(cfg: RunConfig, name: str, upstream: dict[str, dict]) -> str:
    missing = [u for u in STAGES[name] if u not in upstream]
    if missing:
        raise StageError(f"stage {name} needs committed upstream stages: {', '.join(missing)}")
    ups = {u: output_digest(upstream[u]) for u in STAGES[name]}
    return stage_key(name, code_version(name), cfg.section(name), ups)


def lookup(store: Store, cfg: RunConfig, name: str, upstream: dict[str, dict]) -> tuple[str, dict | None]:
    key = compute_key(cfg, name, upstream)
    return key, store.manifest(name, key)


def committed(store: Store, cfg: RunConfig, order=STAGES, skip=()) -> dict[str, dict]:
    """The committed manifests of a config's stages (of `order`, but `skip`), as far as they can be
    known without building anything: a stage whose upstream is not built has no key yet."""
    built: dict[str, dict] = {}
    for name in order:
        if name not in skip and all(u in built for u in STAGES[name]):
            _, m = lookup(store, cfg, name, {u: built[u] for u in STAGES[name]})
            if m is not None:
                built[name] = m
    return built


def run_stage(store: Store, cfg: RunConfig, name: str, upstream: dict[str, dict],
              force: bool = False, log: Log = print, on_progress: OnProgress | None = None) -> tuple[dict, bool]:
    """Return (manifest, reused). Reuses the committed output unless force; else runs the stage.
    on_progress receives the progress events of a running torchrun stage (nanopipe.progress)."""
    mod = stage_module(name)
    key = compute_key(cfg, name, upstream)
    manifest = None if force else store.manifest(name, key)  # a forced stage's manifest is not read: it may be damaged
    if manifest is not None:
        return manifest, True
    with stage_lock(store, name, key, log):
        manifest = None if force else store.manifest(name, key)
        if manifest is not None:
            log(f"[{name}] reused {name}/{key[:16]}: another run built it while this one waited")
            return manifest, True
        return _build(store, cfg, mod, name, key, upstream, force, log, on_progress), False


def _build(store: Store, cfg: RunConfig, mod, name: str, key: str, upstream: dict[str, dict],
           force: bool, log: Log, on_progress: OnProgress | None) -> dict:
    if force:
        log(f"[{name}] runs: forced")
        # A forced rerun starts from scratch: drop the old output and any resume state.
        store.remove(store.stage_dir(name, key))
    else:
        log(f"[{name}] runs: " + "; ".join(why(store, cfg, name, upstream)["reasons"]))
    upstream = {u: upstream[u] for u in STAGES[name]}
    if getattr(mod, "LAUNCH", None) == "torchrun":
        if hasattr(mod, "prepare"):
            mod.prepare(getattr(cfg, name))  # one-time work (downloads) before the ranks start
        return launch_child(store, cfg, name, key, upstream, log, on_progress)
    return execute(store, name, key, getattr(cfg, name), upstream, log, on_progress=on_progress)


def execute(store: Store, name: str, key: str, config: BaseModel, upstream: dict[str, dict],
            log: Log = print, rank: int = 0, world_size: int = 1, code: dict | None = None,
            on_progress: OnProgress | None = None, tracking: TrackingConfig | None = None) -> dict | None:
    """Run the stage body in this process; rank 0 commits the manifest (with ``code``: the stage_code
    the key was computed from, passed by a parent process; default: this process's)."""
    mod = stage_module(name)
    started = time.time()
    reset_faults()
    writer = store.writer(name, key)
    ctx = StageContext(store, name, key, config, upstream, writer, log, rank, world_size,
                       on_progress=on_progress, tracking=tracking)
    log(f"[{name}] running (key {key[:16]}, store {store.url_of(writer.dir)})")
    metrics = mod.run(ctx) or {}
    if rank != 0:
        return None
    code = code or stage_code(name)
    manifest = writer.commit(config=config.model_dump(mode="json"), upstream=upstream,
                             code_version=code["code_version"], metrics=metrics, started_at=started,
                             extra={"code": code["code"]})
    log(f"[{name}] committed {len(manifest['files'])} files in {manifest['timings']['seconds']:.1f}s")
    return manifest


# ---- one run of a stage key at a time ----

FRESH_PROGRESS_S = 120  # a remote store's progress file this recent: its stage runs (on some host)

LOCK_POLL_S = 0.5
LOCK_SAY_EVERY_S = 60.0  # a waiting run repeats what it waits for this often


@contextlib.contextmanager
def _flock(path: str, mode: int, log: Log, waiting: Callable[[], str]) -> Iterator[IO]:
    """Hold flock `mode` on the local file `path` for the block; while another process (or another
    open of the file) holds it, poll, and log `waiting()` at once and then every minute."""
    with writing(path):  # a store that cannot be written cannot hold its lock files either
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    with f:
        said = None
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if said is None or time.monotonic() - said >= LOCK_SAY_EVERY_S:
                    log(waiting())
                    said = time.monotonic()
                time.sleep(LOCK_POLL_S)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_lock(store: Store, name: str, key: str, log: Log = print) -> Iterator[None]:
    """Held while this process runs (name, key); the file then names the holder (see `holder`)."""
    path = store.lock_path(name, key)

    def waiting() -> str:
        who = holder(path)
        by = f"pid {who['pid']} on {who['host']}, since {who['started_at']}" if who else "another process"
        return f"[{name}] waiting: another run of {name}/{key[:16]} ({by}) holds {path}"

    with _flock(path, fcntl.LOCK_EX, log, waiting) as f:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"stage": name, "key": key, "pid": os.getpid(), "host": socket.gethostname(),
                            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}))
        f.flush()
        yield


def holder(path: str) -> dict | None:
    """What the holder of a stage lock wrote into it (pid, host, started_at, argv); None if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def running(store: Store, name: str, key: str) -> dict | None:
    """Who runs (name, key) on this host now: the holder of its lock ({"pid", "host", "started_at", ...};
    {} when only ranks of an earlier run are left); None when no live process holds it."""
    for path in (store.lock_path(name, key), store.rank_lock_path(name, key)):
        if not os.path.exists(path):
            continue
        with open(path, "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return holder(store.lock_path(name, key)) or {}
            fcntl.flock(f, fcntl.LOCK_UN)
    return None


def activity(store: Store, name: str, key: str) -> dict | None:
    """The run building (name, key) now: {"holder": `running`'s answer, "progress": its rank 0's latest
    progress event or None}; None when nothing runs it. A local store's lock says; a remote store's
    lock only knows this host, so there a fresh progress file counts too (a run on another host)."""
    who = running(store, name, key)
    progress = read_progress(store, name, key)
    if who is None and not (progress and not store.is_local and _age_s(progress.get("updated_at")) < FRESH_PROGRESS_S):
        return None
    return {"holder": who, "progress": progress}


def _age_s(iso: str | None) -> float:
    import datetime as dt

    try:
        return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return float("inf")


def run_pipeline(store: Store, cfg: RunConfig, order: list[str], force: list[str] | tuple[str, ...] = (),
                 log: Log = print) -> dict[str, tuple[dict, bool]]:
    """Run stages in order without Prefect; returns name -> (manifest, reused)."""
    done: dict[str, tuple[dict, bool]] = {}
    for name in order:
        upstream = {u: done[u][0] for u in STAGES[name]}
        done[name] = run_stage(store, cfg, name, upstream, force=name in force, log=log)
        if done[name][1]:
            log(f"[{name}] reused {name}/{done[name][0]['key'][:16]}")
    return done


# ---- torchrun stages: the parent writes a launch spec, the child runs the body and commits ----

ERROR_PREFIX = "nanopipe: error: "
CONFIG_ERROR_PREFIX = "nanopipe: config error: "  # a setting the child found unusable (e.g. more steps than data)
CONFIG_ERRORS = (ConfigError, SizingError)


def launch_child(store: Store, cfg: RunConfig, name: str, key: str, upstream: dict[str, dict], log: Log,
                 on_progress: OnProgress | None = None) -> dict:
    section = getattr(cfg, name)
    writer = store.writer(name, key)
    spec = {"stage": name, "key": key, "config": section.model_dump(mode="json"), "upstream": upstream,
            "code": stage_code(name), "tracking": cfg.tracking.model_dump(mode="json")}
    with writing(store.url_of(writer.work)):
        store.fs.makedirs(writer.work, exist_ok=True)
        store.fs.pipe_file(store.launch_spec_path(name, key), json.dumps(spec).encode())
    cmd = torchrun_command(
        "nanopipe.runner", ["--store", store.url, "--stage", name, "--key", key],
        nproc_per_node=section.nproc_per_node, nnodes=section.nnodes, rdzv_endpoint=section.rdzv_endpoint,
        standalone=section.nnodes == 1,
    )
    log_path = store.local_launch_log(name, key)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with _flock(store.rank_lock_path(name, key), fcntl.LOCK_EX, log, lambda: (
            f"[{name}] waiting: ranks of an earlier run of {name}/{key[:16]} are still alive "
            f"(they hold {store.rank_lock_path(name, key)})")):
        pass  # none left: this run's ranks may start
    log(f"[{name}] launching: {' '.join(cmd[2:])}")

    def on_line(line: str) -> None:  # the child's progress lines go to on_progress, the rest to the log
        event = parse_progress(line)
        if event is None:
            log(line)
        elif on_progress is not None:
            on_progress(event)

    try:
        run_streaming(cmd, log_path, on_line=on_line, env=training_env())
    except LaunchError as e:
        # The child's one-line store error (full disk, read-only store, damaged input) is the error here too.
        for prefix, error in ((CONFIG_ERROR_PREFIX, ConfigError), (ERROR_PREFIX, StoreError)):
            said = [line.split(prefix, 1)[1].strip() for line in e.tail if prefix in line]
            if said:
                raise error(f"{said[-1]} (stage {name}; full log: {log_path})") from None
        raise
    finally:
        if not store.is_local:  # keep the full log beside the stage's outputs (not part of the manifest)
            store.fs.put_file(log_path, store.launch_log_path(name, key))
    manifest = store.manifest(name, key)
    if manifest is None:
        raise StageError(f"stage {name}: the training process exited cleanly but committed no manifest (log: {log_path})")
    return manifest


def child_main(argv: list[str] | None = None) -> None:
    """Entry point of a torchrun child: python -m nanopipe.runner --store URL --stage NAME --key KEY."""
    import argparse

    p = argparse.ArgumentParser(prog="nanopipe.runner")
    p.add_argument("--store", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args(argv)
    die_with_parent()  # torchrun's ranks sit in sessions of their own: tie them to torchrun
    store = Store(a.store)
    spec_path = store.launch_spec_path(a.stage, a.key)
    try:
        spec = json.loads(store.fs.cat_file(spec_path))
    except FileNotFoundError:
        raise StoreError(f"no launch spec at {store.url_of(spec_path)}; start stages through nanopipe, not by hand") from None
    model_cls = type(getattr(RunConfig(), a.stage))
    config = model_cls.model_validate(spec["config"])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else (lambda s: None)
    try:
        with _flock(store.rank_lock_path(a.stage, a.key), fcntl.LOCK_SH, log,
                    lambda: f"[{a.stage}] rank {rank} waiting for {store.rank_lock_path(a.stage, a.key)}"):
            execute(store, a.stage, a.key, config, spec["upstream"], log=log, rank=rank, world_size=world,
                    code=spec.get("code"), on_progress=print_progress if rank == 0 else None,
                    tracking=TrackingConfig.model_validate(spec.get("tracking", {})))
    except (StoreError, *CONFIG_ERRORS) as e:  # one line the parent can show as it is (see launch_child)
        print(f"{CONFIG_ERROR_PREFIX if isinstance(e, CONFIG_ERRORS) else ERROR_PREFIX}{e}", flush=True)
        sys.exit(1)
    sys.stdout.flush()


if __name__ == "__main__":
    child_main()
