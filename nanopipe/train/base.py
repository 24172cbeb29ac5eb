"""Base pretraining (nanochat's base_train): Muon + AdamW, gradient accumulation, Chinchilla horizon.

Runs inside a torchrun child (see nanopipe/runner.py). Rank 0 logs and writes shared files;
every rank saves its own optimizer and RNG state into the checkpoint. A rerun of the same
stage key resumes from the newest complete checkpoint and ends with bitwise the same weights
as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanopipe.data.loader import DataLoader, val_batches
from nanopipe.eval.bpb import evaluate_bpb
from nanopipe import loading
from nanopipe.model import GPT, GPTConfig
from nanopipe.tokenizer import Tokenizer
from nanopipe.train.common import LoopSpec, init_distributed, loop_metrics, model_bytes, train_loop

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

def load_tokenizer(ctx: "StageContext") -> Tokenizer:
    """The upstream tokenizer, every file verified against its manifest."""
    return loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])


def load_token_bytes(ctx: "StageContext") -> torch.Tensor:
    arr = np.load(io.BytesIO(ctx.upstream_bytes("tokenizer", "token_bytes.npy")), allow_pickle=False)
    return torch.from_numpy(arr.astype(np.int64))


def data_files(ctx: "StageContext", split: str) -> list[str]:
    """Verified local paths of the data stage's shards of one split, in order."""
    rels = sorted(f["path"] for f in ctx.upstream["data"]["files"]
                  if f["path"].startswith(f"{split}/") and f["path"].endswith(".parquet"))
    return [ctx.upstream_file("data", rel) for rel in rels]


def horizon(cfg, num_params: int, flops_per_token: float) -> int:
    """Steps to train: explicit, from a FLOP budget, or from tokens per parameter (Chinchilla: 20)."""
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    if cfg.target_flops > 0:
        return max(1, round(cfg.target_flops / (flops_per_token * cfg.total_batch_size)))
    return max(1, round(cfg.target_param_data_ratio * num_params / cfg.total_batch_size))


def train(ctx: "StageContext") -> dict:
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads, cfg.seed)
    log, cuda = ctx.log, d.device.type == "cuda"

    tok = load_tokenizer(ctx)
    token_bytes = load_token_bytes(ctx).to(d.device)
    train_files, val_files = data_files(ctx, "train"), data_files(ctx, "val")

    mcfg = GPTConfig.from_depth(cfg.depth, tok.vocab_size, cfg.sequence_len, cfg.head_dim, cfg.n_kv_head)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device=d.device)
    model.init_weights(seed=cfg.seed)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    optimizers = model.setup_optimizers(cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.weight_decay,
                                        ns_dtype=cfg.muon_ns_dtype)
    use_compile = cfg.compile if cfg.compile is not None else cuda
    fwd = torch.compile(model, dynamic=False) if use_compile else model

    tokens_per_micro = cfg.device_batch_size * cfg.sequence_len * d.world_size
    if cfg.total_batch_size % tokens_per_micro:
        raise ValueError(f"base_train.total_batch_size ({cfg.total_batch_size}) must be a multiple of "
                         f"device_batch_size x sequence_len x ranks ({tokens_per_micro})")
    grad_accum = cfg.total_batch_size // tokens_per_micro
    steps = horizon(cfg, num_params, flops_per_token)
    log(f"[base_train] model {mcfg} | {num_params:,} params | {flops_per_token:.3e} FLOPs/token")
    log(f"[base_train] {steps} steps x {cfg.total_batch_size:,} tokens = {steps * cfg.total_batch_size:,} tokens "
        f"({steps * cfg.total_batch_size / num_params:.1f} per param) | grad accum {grad_accum} | "
        f"{d.world_size} rank(s) on {d.device}{' + compile' if use_compile else ''}")
    log(f"[base_train] {optimizers[1].describe()}")

    spec = LoopSpec("base_train", steps, grad_accum, flops_per_token, cfg.grad_clip, cfg.warmup_ratio,
                    cfg.warmdown_ratio, cfg.final_lr_frac, cfg.eval_every, cfg.checkpoint_every,
                    cfg.keep_checkpoints, "val_bpb")

    def make_batches(resume):
        return DataLoader(train_files, tok, cfg.device_batch_size, cfg.sequence_len, rank=d.rank,
                          world_size=d.world_size, device=d.device, resume_state=resume)

    def evaluate() -> float:
        n = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.sequence_len * d.world_size))
        batches = val_batches(val_files, tok, cfg.device_batch_size, cfg.sequence_len, d.rank, d.world_size,
                              max_batches=n, device=d.device)
        return evaluate_bpb(fwd, batches, token_bytes, d.device)

    state = train_loop(ctx, d, spec, model, fwd, optimizers, make_batches, evaluate, log)
    metrics = {**loop_metrics(spec, state, d), "params": num_params, "flops_per_token": flops_per_token,
               "muon_ns_dtype": optimizers[1].ns_dtype_name}
    if d.is_master:
        w = ctx.writer
        w.write_bytes("model.pt", model_bytes(model))
        w.write_json("model_config.json", {**mcfg.__dict__, "depth": cfg.depth})
        w.write_json("loss_curve.json", {"train": state["curve"], "val_bpb": state["val"]})
    d.close()
    return metrics
