"""Nightly evaluation: score the newest committed checkpoints (or given ones), publish a table,
and flag regressions against the previous nightly run.

    deployment `nightly-eval/eval` (prefect.yaml, on a cron schedule), or in process:
    python -c "from flows.nightly_eval import nightly_eval; nightly_eval(max_examples=50)"

Every model gets bits per byte on its own validation shard and CORE; chat models (mid_train,
sft, rl) also get the chat evals (ARC, MMLU, GSM8K, HumanEval, ChatCORE). Each run is recorded
as JSON under the store's nightly dir; the next run compares with the newest record, stage by
stage (tonight's newest sft against last night's, even if it is a different checkpoint).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from nanopipe import loading
from nanopipe.lineage import ancestor
from nanopipe.store import Store, StoreError
from nanopipe.device import autocast_for, setup_device

TABLE_KEY = "nightly-eval-table"
SUMMARY_KEY = "nightly-eval-summary"
CHAT_STAGES = ("mid_train", "sft", "rl")
CHAT_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]


# ----- what to evaluate -----

def resolve_models(store: Store, models: list[str] | None) -> list[dict]:
    """Model manifests: the given specs (key prefix or stage name), else the newest of every model stage."""
    if models:
        found = [loading.find_model(store, spec) for spec in models]
    else:
        found = [ms[-1] for ms in (store.manifests(s) for s in loading.MODEL_STAGES) if ms]
        if not found:
            raise StoreError(f"no committed model in {store.url}; run the pipeline first")
    labels = [m["stage"] for m in found]
    if len(set(labels)) != len(labels):
        raise ValueError(f"give at most one model per stage (got {', '.join(labels)}): runs are compared stage by stage")
    return found


# ----- evaluating one checkpoint (plain code: the task below only wraps it) -----

def evaluate_checkpoint(store: Store, manifest: dict, *, core_source: str, max_examples: int | None,
                        bpb_tokens: int, chat: bool, batch_size: int, device: str, log=print) -> dict:
    """{"val_bpb", "core", "core/<task>"..., and for chat models "chat/<task>", "chat/chatcore"}."""
    from nanopipe.data.loader import val_batches
    from nanopipe.eval.bpb import evaluate_bpb
    from nanopipe.eval.core import evaluate_core
    from nanopipe.eval.core_data import load_core_tasks

    dev = setup_device(device)  # CUDA: TF32 here, bf16 autocast below and in the engine
    autocast = autocast_for(dev)
    model = loading.load_model(store, manifest, dev)
    tok = loading.load_tokenizer(store, loading.tokenizer_of(store, manifest))
    seq = model.config.sequence_len
    data = ancestor(store, manifest, "data")
    val = [store.local_path(data, f["path"]) for f in sorted(data["files"], key=lambda f: f["path"])
           if f["path"].startswith("val/") and f["path"].endswith(".parquet")]
    if not val:
        raise StoreError(f"data/{data['key'][:16]} has no validation shard")
    n_batches = max(1, bpb_tokens // (batch_size * seq))
    metrics: dict = {}
    with torch.no_grad(), autocast:
        batches = val_batches(val, tok, batch_size, seq, max_batches=n_batches, device=dev)
        metrics["val_bpb"] = evaluate_bpb(model, batches, tok.token_bytes().to(dev), dev)
        log(f"[nightly] {manifest['stage']}: val bpb {metrics['val_bpb']:.4f}")
        core = evaluate_core(model, tok, load_core_tasks(core_source, log=log), seq, dev, max_examples=max_examples,
                             batch_size=batch_size, log=log)
    metrics["core"] = core["core"]
    metrics.update({f"core/{label}": r["accuracy"] for label, r in core["tasks"].items()})
    if chat and manifest["stage"] in CHAT_STAGES:
        from nanopipe.engine import Engine
        from nanopipe.eval.chat import evaluate_chat

        engine = Engine(model, tok)
        try:
            with torch.no_grad(), autocast:
                res = evaluate_chat(model, tok, engine, CHAT_TASKS, max_examples, dev, batch_size=batch_size, log=log)
        finally:
            engine.close()
        metrics.update({f"chat/{label}": r["accuracy"] for label, r in res["tasks"].items()})
        metrics["chat/chatcore"] = res["chatcore"]
    return metrics


# ----- comparing with the previous run -----

def lower_is_better(metric: str) -> bool:
    return "bpb" in metric or "loss" in metric


def compare(current: dict, previous: dict | None, threshold: float) -> list[dict]:
    """Table rows, one per (stage, metric): value, previous value, delta, status.

    status: "REGRESSION" when the metric moved the wrong way by more than `threshold`
    (absolute: bpb up, scores down), "improved" when it moved the right way by more,
    "ok" otherwise, "new" when the previous run did not have it.
    """
    prev = (previous or {}).get("results", {})
    rows = []
    for stage, res in current["results"].items():
        before = prev.get(stage, {})
        for metric, value in res["metrics"].items():
            old = before.get("metrics", {}).get(metric)
            row = {"stage": stage, "key": res["key"][:16], "metric": metric, "value": round(value, 6),
                   "previous": None if old is None else round(old, 6), "delta": None, "status": "new",
                   "previous_key": before.get("key", "")[:16] or None}
            if old is not None:
                delta = value - old
                worse = delta > threshold if lower_is_better(metric) else delta < -threshold
                better = delta < -threshold if lower_is_better(metric) else delta > threshold
                row.update(delta=round(delta, 6), status="REGRESSION" if worse else "improved" if better else "ok")
            rows.append(row)
    return rows


def previous_record(store: Store) -> dict | None:
    """The newest nightly record in the store."""
    records = store.nightly_records()
    if not records:
        return None
    try:
        return json.loads(store.fs.cat_file(records[-1]))
    except json.JSONDecodeError as e:
        raise StoreError(f"{store.url_of(records[-1])}: nightly record is not valid JSON ({e})") from None


def write_record(store: Store, record: dict) -> str:
    """Store a run's record (named by the time of writing, see Store.nightly_record_path); returns its URL."""
    path = store.nightly_record_path(dt.datetime.now(dt.timezone.utc), record["run_id"])
    store.fs.makedirs(store.nightly_dir(), exist_ok=True)
    store.fs.pipe_file(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return store.url_of(path)


def summary_markdown(rows: list[dict], previous: dict | None, threshold: float) -> str:
    regressions = [r for r in rows if r["status"] == "REGRESSION"]
    since = f"the run of {previous['created_at']}" if previous else "nothing (first recorded run)"
    out = [f"# nightly eval: {len(regressions)} regression(s)\n",
           f"compared with {since}; threshold {threshold} (absolute)\n"]
    if regressions:
        out.append("| stage | metric | previous | now | delta |\n|---|---|---|---|---|")
        out += [f"| {r['stage']} | {r['metric']} | {r['previous']:.4f} | {r['value']:.4f} | {r['delta']:+.4f} |"
                for r in regressions]
    return "\n".join(out) + "\n"


# ----- Prefect -----

@task(task_run_name="eval-{stage}", cache_policy=NO_CACHE, retries=0)
def evaluate_task(stage: str, key: str, store_url: str, settings: dict) -> dict:
    store = Store(store_url)
    manifest = store.manifest(stage, key)
    if manifest is None:
        raise StoreError(f"{stage}/{key[:16]} is no longer in {store.url}")
    return evaluate_checkpoint(store, manifest, log=get_run_logger().info, **settings)


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(models: list[str] | None = None, store: str | None = None, core_source: str = "offline",
                 max_examples: int | None = 200, bpb_tokens: int = 1 << 20, chat: bool = True,
                 batch_size: int = 8, device: str = "auto", threshold: float = 0.02,
                 fail_on_regression: bool = False) -> dict:
    """Evaluate `models` (key prefixes or stage names; default the newest of each model stage).

    max_examples: items per CORE / chat task (None = all). threshold: an absolute change beyond
    which a metric counts as a regression (bpb up, scores down). fail_on_regression: end the
    run Failed when any metric regressed, so notifications fire.
    """
    logger = get_run_logger()
    st = Store(store)
    targets = resolve_models(st, models)
    logger.info("evaluating " + ", ".join(f"{m['stage']}/{m['key'][:16]}" for m in targets))
    settings = {"core_source": core_source, "max_examples": max_examples, "bpb_tokens": bpb_tokens,
                "chat": chat, "batch_size": batch_size, "device": device}
    results = {m["stage"]: {"key": m["key"], "metrics": evaluate_task(m["stage"], m["key"], st.url, settings)}
               for m in targets}
    previous = previous_record(st)
    record = {"run_id": str(flow_run.get_id() or uuid.uuid4()),
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "settings": settings, "threshold": threshold, "results": results}
    rows = compare(record, previous, threshold)
    record["regressions"] = [f"{r['stage']}/{r['metric']}" for r in rows if r["status"] == "REGRESSION"]
    url = write_record(st, record)
    create_table_artifact(key=TABLE_KEY, table=rows,
                          description=f"nightly eval of {', '.join(results)}; record: {url}")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(rows, previous, threshold),
                             description="nightly eval regressions")
    logger.info(f"{len(rows)} metrics, {len(record['regressions'])} regression(s); record {url}")
    if record["regressions"] and fail_on_regression:
        raise RuntimeError(f"nightly eval: regressions beyond {threshold}: {', '.join(record['regressions'])}")
    return {"rows": rows, "regressions": record["regressions"], "record": url}
