"""One Prefect task for every stage, plus the artifacts each stage publishes, the device slot
device work holds, and what stops a cancelled run's processes.

The task body is nanopipe.runner.run_stage: it is the same code that `python -m nanopipe stage`
runs without Prefect. Prefect adds the cache (StoreKeyPolicy), retries, logs and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.states import Cancelled

from nanopipe.artifacts import artifact_key
from nanopipe.config import RunConfig
from nanopipe.launch import LaunchCancelled, terminate_all
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
_device_user: list[str] = []  # who holds _DEVICES, for the waiting message

GPU_LIMIT = "gpu"  # the global concurrency limit of device work (deployments/pools.yaml)
# The server's shortest lease: the slot of a holder that died without releasing it (a SIGKILLed
# engine) is free again within about a minute (plus the server's 15 s sweep), not five.
GPU_LEASE_S = 60
GPU_TRY_S = 2.0  # how long a stage waits for a slot before saying so


@contextlib.contextmanager
def device_slot(user: str, log=print) -> Iterator[None]:
    """Held while device work runs (a torchrun stage, the nightly eval): this process's device lock and
    a slot of the global "gpu" concurrency limit (across workers; a no-op where that limit does not
    exist). Waiting for either is logged, with what holds it."""
    if not _DEVICES.acquire(blocking=False):
        log(f"[{user}] waiting for this process's device: {', '.join(_device_user) or 'another stage'} is using it")
        _DEVICES.acquire()
    _device_user[:] = [user]
    try:
        with _gpu_slot(user, log):
            yield
    finally:
        _device_user.clear()
        _DEVICES.release()


@contextlib.contextmanager
def _gpu_slot(user: str, log) -> Iterator[None]:
    ctx = TaskRunContext.get()
    opts = {"occupy": 1, "lease_duration": GPU_LEASE_S,
            "holder": ConcurrencyLeaseHolder(type="task_run", id=ctx.task_run.id) if ctx else None}
    # Said from a timer, not after a first try with a timeout: Prefect logs a timed-out try as an error.
    waiting = threading.Timer(GPU_TRY_S, lambda: log(
        f"[{user}] waiting for a slot of the global concurrency limit {GPU_LIMIT!r} ({_gpu_usage()}): "
        "device work of another run holds it"))
    waiting.daemon = True
    with contextlib.ExitStack() as held:
        leases = held.enter_context(ConcurrencyContext())  # where Prefect records the lease it grants
        waiting.start()
        try:
            held.enter_context(concurrency(GPU_LIMIT, **opts))
        finally:
            waiting.cancel()
        if leases.cleanup_lease_ids and ctx is not None:
            held.enter_context(_lease_label(ctx.task_run, leases.cleanup_lease_ids[-1]))
        yield


LEASE_LABEL = "nanopipe.gpu-lease."  # + task run id: a flow run label naming a gpu lease it holds
RELEASED = "released"


@contextlib.contextmanager
def _lease_label(task_run, lease_id) -> Iterator[None]:
    """Name the lease on the flow run while it is held, so that release_dead_leases can release it
    when the run's process dies without releasing anything (SIGKILL)."""
    key = LEASE_LABEL + str(task_run.id)
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(task_run.flow_run_id, {key: str(lease_id)})
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(task_run.flow_run_id, {key: RELEASED})


def release_dead_leases(flow=None, flow_run=None, state=None) -> None:
    """on_crashed hook: release the `gpu` slots a crashed flow run still holds. A process worker runs
    it when the run's process dies (a SIGKILLed engine releases nothing itself), so the slot comes
    back at once instead of when its lease expires."""
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(flow_run.id).labels
        for key, lease in labels.items():
            if key.startswith(LEASE_LABEL) and lease != RELEASED:
                try:
                    client.release_concurrency_slots_with_lease(lease_id=uuid.UUID(str(lease)))
                except Exception:  # released or expired meanwhile
                    pass
                client.update_flow_run_labels(flow_run.id, {key: RELEASED})


def _gpu_usage() -> str:
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        return f"{limit.active_slots} of {limit.limit} slots in use"
    except Exception as e:  # only for the message
        return f"usage unknown: {type(e).__name__}"


def uses_device(stage: str) -> bool:
    """Stages whose work runs on the device (GPUs, or all of a CPU host's cores): the torchrun stages."""
    return getattr(stage_module(stage), "LAUNCH", None) == "torchrun"


# ----- a cancelled run stops its processes -----

CANCEL_POLL_S = 2.0


def stop_launched(flow=None, flow_run=None, state=None) -> None:
    """Stop every child process this process launched (a flow's on_cancellation / on_crashed hook)."""
    terminate_all(f"flow run {state.name if state else 'stopped'}")


@contextlib.contextmanager
def stop_launched_on_cancel(flow_run_id, every_s: float = CANCEL_POLL_S) -> Iterator[None]:
    """While the block runs, a thread polls the flow run's state; once it is Cancelling (Cancel in the
    UI or the API), every child this process launched (torchrun and its ranks, a server) is stopped
    at once: a worker only SIGTERMs this process, after which it would wait for its tasks, and a
    run without a worker (`nanopipe run`) gets no signal at all. Leaving the block with an exception
    (the worker's SIGTERM, Ctrl-C) stops them too."""
    done = threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(every_s):
                try:
                    state = client.read_flow_run(flow_run_id).state
                except Exception:  # the API is briefly unreachable: ask again
                    continue
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    terminate_all(f"flow run {state.name}")
                    return

    watcher = threading.Thread(target=watch, name="nanopipe-cancel-watch", daemon=True)
    if flow_run_id is not None:
        watcher.start()
    try:
        yield
    except BaseException as e:
        terminate_all(f"flow run interrupted ({type(e).__name__})")
        raise
    finally:
        done.set()


@task(cache_policy=StoreKeyPolicy(), persist_result=True, result_serializer="json",
      task_run_name="{stage}", retries=0)
def stage_task(stage: str, config: dict, upstream: dict[str, dict], store_url: str, force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    store = Store(store_url)
    cfg = RunConfig.model_validate(config)
    live = LiveArtifacts(stage, logger)
    try:
        with device_slot(stage, logger.info) if uses_device(stage) else contextlib.nullcontext():
            manifest, reused = run_stage(store, cfg, stage, upstream, force=force, log=logger.info, on_progress=live)
    except LaunchCancelled as e:
        return Cancelled(message=f"{stage}: {e}")
    if not reused:
        live.finish()
        publish_artifacts(store, manifest)
    return manifest


def configured_task(stage: str, storage: WritableFileSystem):
    """The stage task, named after the stage (so it reads as such in the UI from the moment it is
    submitted), bound to the store's result storage, with retries for network stages."""
    opts: dict[str, Any] = {"name": stage, "task_run_name": stage, "result_storage": storage}
    if stage in _NETWORK_STAGES:
        opts.update(retries=int(os.environ.get("NANOPIPE_RETRIES", 2)), retry_delay_seconds=[5, 30],
                    retry_condition_fn=_transient)
    return stage_task.with_options(**opts)
