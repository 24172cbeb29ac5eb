"""Nightly evaluation without Prefect: score checkpoints, measure each score's noise, and compare
with a previous run that measured the same way (flows/nightly_eval.py schedules and publishes it).

A run is comparable with an earlier one only when both used the same evaluation settings (tasks,
examples per task, tokens, batch size, device) and the same evaluation code (``eval_code``: the
digest of this module and everything it imports, nanopipe.codeid). The newest earlier record that
matches is the baseline; when none does, the run starts a new baseline and says why (what changed).

Every score comes with its standard error, so a change within noise is not called a regression:
accuracy at n examples sqrt(p(1-p)/n) (with p taken as (k+1)/(n+2), so 0/n and n/n are not
"certain"); centered scores (CORE, ChatCORE) combine their tasks' errors; bits per byte from the
spread of the per-batch values (a ratio estimate). A metric moved the wrong way when it moved by
more than both `threshold` and Z standard errors of the difference.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import torch

from nanopipe import loading
from nanopipe.codeid import combined_digest, module_digests
from nanopipe.device import autocast_for, setup_device
from nanopipe.lineage import ancestor
from nanopipe.store import Store, StoreError, writing

CHAT_STAGES = ("mid_train", "sft", "rl")
CHAT_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]
Z = 2.0  # standard errors of a difference beyond which it is not noise (about 95%)


def eval_code() -> dict:
    """{"version": digest, "modules": {module: digest}} of the evaluation code (this module's import closure)."""
    modules = module_digests(__name__)
    return {"version": combined_digest(modules), "modules": modules}


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


# ----- scores and their standard errors -----

def accuracy_stderr(accuracy: float, n: int) -> float:
    k = accuracy * n
    p = (k + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / max(n, 1))


def centered_stderr(tasks: dict, chance_of) -> float:
    """Standard error of the mean centered score over `tasks` ({label: {"accuracy", "n", ...}});
    chance_of(result) -> the task's chance level as a fraction."""
    var = sum((accuracy_stderr(r["accuracy"], r["n"]) / (1 - chance_of(r))) ** 2 for r in tasks.values())
    return math.sqrt(var) / len(tasks)


def ratio_stderr(values: list[float], weights: list[float]) -> float | None:
    """Standard error of sum(v*w)/sum(w) from the spread of the v (None for a single value)."""
    k = len(values)
    if k < 2:
        return None
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights)) / total
    return math.sqrt(k / (k - 1) * sum((w * (v - mean)) ** 2 for v, w in zip(values, weights))) / total


def bpb_with_stderr(model, batches, token_bytes: torch.Tensor, device) -> tuple[float, float | None]:
    """Bits per byte over `batches` (the same value evaluate_bpb gives for all of them at once) and
    its standard error over the batches."""
    from nanopipe.eval.bpb import evaluate_bpb

    per_batch, nbytes = [], []
    for x, y in batches:
        per_batch.append(evaluate_bpb(model, [(x, y)], token_bytes, device))
        nbytes.append(int(torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0).sum()))
    value = sum(b * n for b, n in zip(per_batch, nbytes)) / sum(nbytes)
    return value, ratio_stderr(per_batch, nbytes)


def evaluate_checkpoint(store: Store, manifest: dict, *, core_source: str, max_examples: int | None,
                        bpb_tokens: int, chat: bool, batch_size: int, device: str, log=print) -> dict:
    """{"metrics": {"val_bpb", "core", "core/<task>"..., for chat models "chat/<task>", "chat/chatcore"},
    "stderr": the standard error of each metric (None where it cannot be estimated)}."""
    from nanopipe.data.loader import val_batches
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
    stderr: dict = {}
    with torch.no_grad(), autocast:
        batches = val_batches(val, tok, batch_size, seq, max_batches=n_batches, device=dev)
        metrics["val_bpb"], stderr["val_bpb"] = bpb_with_stderr(model, batches, tok.token_bytes().to(dev), dev)
        log(f"[nightly] {manifest['stage']}: val bpb {metrics['val_bpb']:.4f}")
        core = evaluate_core(model, tok, load_core_tasks(core_source, log=log), seq, dev, max_examples=max_examples,
                             batch_size=batch_size, log=log)
    metrics["core"] = core["core"]
    stderr["core"] = centered_stderr(core["tasks"], lambda r: 0.01 * r["random_baseline"])
    for label, r in core["tasks"].items():
        metrics[f"core/{label}"], stderr[f"core/{label}"] = r["accuracy"], accuracy_stderr(r["accuracy"], r["n"])
    if chat and manifest["stage"] in CHAT_STAGES:
        from nanopipe.engine import Engine
        from nanopipe.eval.chat import evaluate_chat

        engine = Engine(model, tok)
        try:
            with torch.no_grad(), autocast:
                res = evaluate_chat(model, tok, engine, CHAT_TASKS, max_examples, dev, batch_size=batch_size, log=log)
        finally:
            engine.close()
        for label, r in res["tasks"].items():
            metrics[f"chat/{label}"], stderr[f"chat/{label}"] = r["accuracy"], accuracy_stderr(r["accuracy"], r["n"])
        metrics["chat/chatcore"] = res["chatcore"]
        stderr["chat/chatcore"] = centered_stderr(res["tasks"], lambda r: r["chance"])
    return {"metrics": metrics, "stderr": stderr}


# ----- comparing with the baseline -----

def lower_is_better(metric: str) -> bool:
    return "bpb" in metric or "loss" in metric


def compare(current: dict, baseline: dict | None, threshold: float) -> list[dict]:
    """Table rows, one per (stage, metric): value, its standard error, the baseline's value, delta,
    noise (Z standard errors of the difference), status.

    status: "REGRESSION" when the metric moved the wrong way (bpb up, scores down) by more than
    both `threshold` (absolute) and the noise, "improved" when it moved the right way by as much,
    "ok" otherwise, "new" when the baseline does not have it (or there is no baseline).
    """
    prev = (baseline or {}).get("results", {})
    rows = []
    for stage, res in current["results"].items():
        before = prev.get(stage, {})
        for metric, value in res["metrics"].items():
            se = (res.get("stderr") or {}).get(metric)
            old = before.get("metrics", {}).get(metric)
            row = {"stage": stage, "key": res["key"][:16], "metric": metric, "value": round(value, 6),
                   "stderr": None if se is None else round(se, 6),
                   "previous": None if old is None else round(old, 6), "delta": None, "noise": None, "status": "new",
                   "previous_key": before.get("key", "")[:16] or None}
            if old is not None:
                old_se = (before.get("stderr") or {}).get(metric)
                noise = Z * math.hypot(se or 0.0, old_se or 0.0)
                margin = max(threshold, noise)
                delta = value - old
                worse = delta > margin if lower_is_better(metric) else delta < -margin
                better = delta < -margin if lower_is_better(metric) else delta > margin
                row.update(delta=round(delta, 6), noise=round(noise, 6),
                           status="REGRESSION" if worse else "improved" if better else "ok")
            rows.append(row)
    return rows


def read_records(store: Store) -> list[dict]:
    """The nightly records in the store, oldest first (each with its "url")."""
    out = []
    for path in store.nightly_records():
        try:
            out.append({**json.loads(store.fs.cat_file(path)), "url": store.url_of(path)})
        except json.JSONDecodeError as e:
            raise StoreError(f"{store.url_of(path)}: nightly record is not valid JSON ({e})") from None
    return out


def baseline(records: list[dict], settings: dict, code: dict) -> tuple[dict | None, str]:
    """The newest record measured with these settings and this evaluation code, and one line saying
    what tonight is compared with, or why it starts a new baseline."""
    for r in reversed(records):
        if r.get("settings") == settings and (r.get("code") or {}).get("version") == code["version"]:
            return r, f"compared with the run of {r['created_at']} (same settings and evaluation code)"
    if not records:
        return None, "new baseline: the first recorded run"
    last = records[-1]
    changed = [f"{k} {last.get('settings', {}).get(k)!r} -> {v!r}" for k, v in settings.items()
               if last.get("settings", {}).get(k) != v]
    before = (last.get("code") or {}).get("modules", {})
    changed += [f"code: {m} changed" for m in sorted(set(before) | set(code["modules"]))
                if before.get(m) != code["modules"].get(m)][:5]
    return None, (f"new baseline: measured differently from the run of {last['created_at']} "
                  f"({'; '.join(changed) or 'record without settings'})")


def write_record(store: Store, record: dict) -> str:
    """Store a run's record, whole or not at all (a half-written one would break every later night),
    named by its created_at (see Store.nightly_record_path); returns its URL."""
    path = store.nightly_record_path(dt.datetime.fromisoformat(record["created_at"]), record["run_id"])
    with writing(store.url_of(path)):
        store.fs.makedirs(store.nightly_dir(), exist_ok=True)
    store.atomic_put(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return store.url_of(path)


def summary_markdown(rows: list[dict], compared: str, threshold: float) -> str:
    regressions = [r for r in rows if r["status"] == "REGRESSION"]
    out = [f"# nightly eval: {len(regressions)} regression(s)\n",
           f"{compared}. A regression moved the wrong way by more than {threshold} (absolute) and more than "
           f"{Z:g} standard errors of the difference (the noise column).\n"]
    if regressions:
        out.append("| stage | metric | previous | now | delta | noise |\n|---|---|---|---|---|---|")
        out += [f"| {r['stage']} | {r['metric']} | {r['previous']:.4f} | {r['value']:.4f} | {r['delta']:+.4f} | "
                f"{r['noise']:.4f} |" for r in regressions]
    return "\n".join(out) + "\n"
