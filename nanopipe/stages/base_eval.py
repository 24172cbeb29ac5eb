"""Stage 5: evaluate the base model — bits per byte on the validation shard, samples, and CORE.

Runs under torchrun: validation batches and CORE items are split across ranks and reduced.
Which CORE it scored is in its metrics (core_name, core_source) and core.json (provenance): "CORE"
on the published eval bundle (the GPU presets; comparable with nanochat's), "CORE (20/22 tasks,
offline substitute)" on the offline build (the CPU presets, or the GPU presets without a network).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanopipe import loading, sizing
from nanopipe.device import compute_dtype
from nanopipe.engine import Engine
from nanopipe.eval.core import evaluate_core
from nanopipe.eval.core_data import core_bundle, load_eval_bundle
from nanopipe.progress import StageProgress
from nanopipe.train.base import load_token_bytes, val_bpb
from nanopipe.train.common import init_distributed, pick_device_batch

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"
# Per-task timings of evaluate_core: manifest metrics, not core.json, whose bytes must depend only on
# the model and the data (they key the stages downstream; a rerun must not change them).
TIMINGS = ("seconds", "items_per_s")
PHASES = ("val_bpb", "samples", "core")  # the parts of the work, in order, for progress events


def prepare(cfg) -> None:
    """Before the ranks start: fetch or build the CORE bundle once (downloads), not once per rank."""
    core_bundle(cfg.core_source)


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads)
    log = ctx.log
    tok = loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])
    model = loading.load_model(ctx.store, ctx.upstream["base_train"], d.device)
    seq = model.config.sequence_len
    watch = StageProgress(ctx, len(PHASES))  # progress by phase: bits per byte, samples, CORE
    watch.update(0, force=True, phase=PHASES[0])

    B = pick_device_batch(d, "base_eval", cfg.device_batch_size, sizing.EVAL_DEVICE_BATCHES,
                          lambda b: sizing.eval_memory(model.config, b, seq, compute_dtype(d.device).itemsize)["total"],
                          log)
    with torch.no_grad(), d.autocast():
        bpb, tokens = val_bpb(ctx, model, tok, load_token_bytes(ctx).to(d.device), d, B, seq, cfg.eval_tokens)
    log(f"[base_eval] val bpb {bpb:.4f} over {tokens:,} tokens")
    watch.update(1, {"val_bpb": bpb}, force=True, phase=PHASES[1])

    samples = sample_prompts(model, tok, cfg) if d.is_master else []
    for s in samples:
        log(f"[base_eval] {s['prompt']!r} -> greedy {s['greedy']!r}")
    watch.update(2, force=True, phase=PHASES[2])

    directory, provenance = core_bundle(cfg.core_source, log=log)
    same_bundle_on_every_rank(d, provenance)
    tasks = load_eval_bundle(directory)
    with torch.no_grad(), d.autocast():
        core = evaluate_core(model, tok, tasks, seq, d.device, max_examples=cfg.core_max_examples,
                             batch_size=cfg.core_batch_size, log=log)
    log(f"[base_eval] {core['core_name']}: {core['core']:.4f} ({core['items_per_s']:.1f} items/s)")
    watch.update(3, {"core": core["core"]}, eta_s=0.0, force=True)
    if d.is_master:
        rows = [{"task": label, **{k: v for k, v in r.items() if k not in TIMINGS}} for label, r in core["tasks"].items()]
        ctx.writer.write_json("core.json", {"core": core["core"], "core_name": core["core_name"], "tasks": rows,
                                            "missing_tasks": core["missing_tasks"], "max_examples": cfg.core_max_examples,
                                            "source": cfg.core_source, "provenance": provenance})
        ctx.writer.write_json("samples.json", samples)
    d.close()
    fallback = {"core_fallback": provenance["fallback"]} if "fallback" in provenance else {}
    return {"val_bpb": bpb, "core": core["core"], "core_name": core["core_name"], "core_source": provenance["source"],
            **fallback, "core_tasks": len(core["tasks"]),
            "missing_tasks": core["missing_tasks"], "core_items_per_s": round(core["items_per_s"], 2),
            "core_task_seconds": {label: round(r["seconds"], 2) for label, r in core["tasks"].items()},
            "samples": samples}


def same_bundle_on_every_rank(d, provenance: dict) -> None:
    """Ranks split every task's items and reduce per task: if one rank fell back to the offline
    build while another downloaded the bundle, their task lists differ and the reductions would
    hang. Fail instead, naming what each rank has."""
    if d.world_size == 1:
        return
    mine = (provenance["source"], provenance.get("sha256"))
    every = [None] * d.world_size
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise RuntimeError(f"CORE: the ranks loaded different bundles {every}; rerun with a stable "
                           f"network, or set base_eval.core_source=offline")


def sample_prompts(model, tok, cfg) -> list[dict]:
    """A greedy and a sampled continuation of each fixed prompt (what the model has learned, at a glance)."""
    engine = Engine(model, tok)
    prompts = [tok.encode(p, prepend=tok.bos_id) for p in cfg.sample_prompts]
    greedy = engine.generate_many(prompts, max_tokens=cfg.sample_tokens, temperature=0.0)
    sampled = engine.generate_many(prompts, max_tokens=cfg.sample_tokens, temperature=1.0, top_k=50, seed=cfg.seed)
    engine.close()
    return [{"prompt": p, "greedy": tok.decode(g.tokens[0]), "sampled": tok.decode(s.tokens[0])}
            for p, g, s in zip(cfg.sample_prompts, greedy, sampled)]
