"""Stage 9a: chat evaluation of the mid-trained and the SFT model (ARC, MMLU, GSM8K, HumanEval, ChatCORE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanopipe import loading
from nanopipe.engine import Engine
from nanopipe.eval.chat import evaluate_chat
from nanopipe.progress import StageProgress
from nanopipe.train.common import init_distributed

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"
PHASES = {"mid": "mid_train", "sft": "sft"}


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads)
    tok = loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])
    # Timings go to the metrics, not chat_eval.json: its bytes are its identity downstream.
    metrics, table, seconds = {}, [], {}
    watch = StageProgress(ctx, len(PHASES))  # progress by phase: one per model evaluated
    for done, (phase, stage) in enumerate(PHASES.items()):
        watch.update(done, _chatcores(metrics), force=True, phase=phase)
        model = loading.load_model(ctx.store, ctx.upstream[stage], d.device)
        engine = Engine(model, tok, max_seq_len=min(model.rotary_seq_len, max(cfg.context_len, model.config.sequence_len)))
        ctx.log(f"[chat_eval] {phase}: {stage} {ctx.upstream[stage]['key'][:16]}")
        with torch.no_grad(), d.autocast():
            res = evaluate_chat(model, tok, engine, cfg.tasks, cfg.max_examples, d.device, max_tokens=cfg.max_tokens,
                                temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                                batch_size=cfg.batch_size, log=ctx.log)
        engine.close()
        for label, r in res["tasks"].items():
            metrics[f"{phase}/{label}"] = r["accuracy"]
            seconds[f"{phase}/{label}"] = r.pop("seconds")
            table.append({"phase": phase, "task": label, **r})
        metrics[f"{phase}/chatcore"] = res["chatcore"]
        ctx.log(f"[chat_eval] {phase}: ChatCORE {res['chatcore']:.4f} over {', '.join(res['chatcore_tasks'])}")
    watch.update(len(PHASES), _chatcores(metrics), eta_s=0.0, force=True)
    if d.is_master:
        ctx.writer.write_json("chat_eval.json", table)
    d.close()
    return {**metrics, "seconds": seconds}


def _chatcores(metrics: dict) -> dict:
    """The ChatCORE of each phase evaluated so far: the live metrics of a progress event."""
    return {k: v for k, v in metrics.items() if k.endswith("/chatcore")}
