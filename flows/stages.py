"""One Prefect task for every stage, plus the artifacts each stage publishes.

The task body is nanopipe.runner.run_stage: it is the same code that `python -m nanopipe stage`
runs without Prefect. Prefect adds the cache (StoreKeyPolicy), retries, logs and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.filesystems import WritableFileSystem
from prefect.concurrency.sync import concurrency
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from nanopipe.config import RunConfig
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
    with device_slot(stage):
        manifest, reused = run_stage(store, cfg, stage, upstream, force=force, log=logger.info)
    if not reused:
        publish_artifacts(store, manifest)
    return manifest


def configured_task(stage: str, storage: WritableFileSystem):
    """The stage task bound to the store's result storage, with retries for network stages."""
    opts: dict[str, Any] = {"result_storage": storage}
    if stage in _NETWORK_STAGES:
        opts.update(retries=int(os.environ.get("NANOPIPE_RETRIES", 2)), retry_delay_seconds=[5, 30],
                    retry_condition_fn=_transient)
    return stage_task.with_options(**opts)
