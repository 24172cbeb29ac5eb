"""Base pretraining (nanochat's base_train): Muon + AdamW, gradient accumulation, Chinchilla horizon.

Before any training work the run checks its data (check_data: the horizon's tokens against what the
data stage holds; data_passes is in the metrics) and resolves device_batch_size=auto.

Runs inside a torchrun child (see nanopipe/runner.py). Rank 0 logs and writes shared files;
every rank saves its own optimizer and RNG state into the checkpoint. A rerun of the same
stage key resumes from the newest complete checkpoint and ends with bitwise the same weights
as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from nanopipe import loading, sizing
from nanopipe.data.loader import DataLoader, sample_chars_per_token, val_batches
from nanopipe.eval.bpb import evaluate_bpb
from nanopipe.device import compile_enabled, compute_dtype
from nanopipe.model import GPT, GPTConfig
from nanopipe.tokenizer import Tokenizer
from nanopipe.train.common import (Dist, LoopSpec, init_distributed, loop_metrics, loss_curve, pick_device_batch,
                                   save_model, supervised_step, train_loop)

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

def load_tokenizer(ctx: "StageContext") -> Tokenizer:
    """The upstream tokenizer, every file verified against its manifest."""
    return loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])


def load_token_bytes(ctx: "StageContext") -> torch.Tensor:
    arr = np.load(io.BytesIO(ctx.upstream_bytes("tokenizer", "token_bytes.npy")), allow_pickle=False)
    return torch.from_numpy(arr.astype(np.int64))


def data_files(ctx: "StageContext", split: str) -> list[str]:
    """The data stage's shards of one split, in order, as paths inside its output (open them
    through shard_path)."""
    return sorted(f["path"] for f in ctx.upstream["data"]["files"]
                  if f["path"].startswith(f"{split}/") and f["path"].endswith(".parquet"))


def shard_path(ctx: "StageContext") -> Callable[[str], str]:
    """The loader's `resolve`: a shard's verified local path; each shard is hashed once per
    process, when the loader first opens it, not all of them before training starts."""
    return functools.partial(ctx.upstream_file, "data")


def val_bpb(ctx: "StageContext", fwd, tok, token_bytes: torch.Tensor, d: Dist, B: int, T: int,
            eval_tokens: int) -> tuple[float, int]:
    """Bits per byte on the data stage's validation shards, over about eval_tokens tokens shared by the
    ranks (base_train's evaluation and base_eval's): (bpb, tokens evaluated). Call under no_grad."""
    n = max(1, eval_tokens // (B * T * d.world_size))
    batches = val_batches(data_files(ctx, "val"), tok, B, T, d.rank, d.world_size, max_batches=n, device=d.device,
                          resolve=shard_path(ctx))
    return evaluate_bpb(fwd, batches, token_bytes, d.device), n * B * T * d.world_size


def check_data(ctx: "StageContext", cfg, tok, files: list[str], steps: int) -> dict:
    """The data the run will read, against what the data stage holds, before any training work.

    Tokens available = the data stage's train characters / chars per token, measured with this
    tokenizer on a sample of the shards (sample_chars_per_token), + one BOS per document. A run that
    needs more (data_passes > 1) raises, naming the shortfall, unless base_train.allow_data_repeat."""
    data = ctx.upstream["data"]["metrics"]
    chars, tokens = sample_chars_per_token(files, tok, resolve=shard_path(ctx))
    chars_per_token = chars / max(tokens, 1)
    available = round(data["train_chars"] / chars_per_token) + data["train_docs"]
    needed = steps * cfg.total_batch_size
    passes = needed / max(available, 1)
    if passes > 1 and not cfg.allow_data_repeat:
        raise sizing.SizingError(
            f"base_train would read its training data {passes:.2f} times: {steps:,} steps x {cfg.total_batch_size:,} "
            f"tokens = {needed:,} tokens, but the data stage holds about {available:,} ({data['train_chars']:,} chars at "
            f"{chars_per_token:.2f} chars/token, measured on {chars:,} chars of its shards): {needed - available:,} "
            f"tokens short. Give the data stage more text (data.source.num_files or max_chars), train fewer steps "
            f"(base_train.num_iterations or target_param_data_ratio), or repeat on purpose: base_train.allow_data_repeat=true")
    return {"data_passes": round(passes, 4), "tokens_available": available, "chars_per_token": round(chars_per_token, 4)}


def train(ctx: "StageContext") -> dict:
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads, cfg.seed)
    log = ctx.log

    tok = load_tokenizer(ctx)
    train_files = data_files(ctx, "train")
    mcfg = GPTConfig.from_depth(cfg.depth, tok.vocab_size, cfg.sequence_len, cfg.head_dim, cfg.n_kv_head)
    num_params, flops_per_token = sizing.num_params(mcfg), sizing.flops_per_token(mcfg)
    steps = sizing.base_steps(cfg.num_iterations, cfg.target_flops, cfg.target_param_data_ratio, num_params,
                              flops_per_token, cfg.total_batch_size)
    data = check_data(ctx, cfg, tok, train_files, steps)
    log(f"[base_train] data: {steps * cfg.total_batch_size:,} of about {data['tokens_available']:,} tokens "
        f"({data['chars_per_token']:.2f} chars/token measured): {data['data_passes']:.3f} passes"
        f"{' (repeat allowed)' if data['data_passes'] > 1 else ''}")

    use_compile = compile_enabled(cfg.compile, d.device)
    B = pick_device_batch(d, "base_train", cfg.device_batch_size,
                          sizing.divisors(cfg.total_batch_size // (cfg.sequence_len * d.world_size) or 1),
                          lambda b: sizing.train_memory(mcfg, b, cfg.sequence_len, compute_dtype(d.device).itemsize,
                                                        use_compile)["total"],
                          log)
    grad_accum = sizing.token_grad_accum("base_train", cfg.total_batch_size, B, cfg.sequence_len, d.world_size,
                                         "sequence_len")
    token_bytes = load_token_bytes(ctx).to(d.device)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device=d.device)
    model.init_weights(seed=cfg.seed)
    optimizers = model.setup_optimizers(cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.weight_decay,
                                        ns_dtype=cfg.muon_ns_dtype)
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    log(f"[base_train] model {mcfg} | {num_params:,} params | {flops_per_token:.3e} FLOPs/token")
    log(f"[base_train] {steps} steps x {cfg.total_batch_size:,} tokens = {steps * cfg.total_batch_size:,} tokens "
        f"({steps * cfg.total_batch_size / num_params:.1f} per param) | device batch {B} x grad accum {grad_accum} | "
        f"{d.world_size} rank(s) on {d.device}{' + compile' if use_compile else ''}")
    log(f"[base_train] {optimizers[1].describe()}")

    spec = LoopSpec("base_train", steps, flops_per_token, cfg.grad_clip, cfg.warmup_ratio, cfg.warmdown_ratio,
                    cfg.final_lr_frac, cfg.eval_every, cfg.checkpoint_every, cfg.keep_checkpoints, "val_bpb")

    def evaluate(step: int) -> tuple[float, str]:
        bpb, _ = val_bpb(ctx, fwd, tok, token_bytes, d, B, cfg.sequence_len, cfg.eval_tokens)
        return bpb, f"val_bpb {bpb:.4f}"

    with DataLoader(train_files, tok, B, cfg.sequence_len, rank=d.rank, world_size=d.world_size,
                    device=d.device, resolve=shard_path(ctx)) as batches:
        state = train_loop(ctx, d, spec, model, optimizers, supervised_step(d, fwd, batches, grad_accum), evaluate,
                           log, data=batches)
    metrics = {**loop_metrics(spec, state, d), "params": num_params, "flops_per_token": flops_per_token,
               "device_batch_size": B, "grad_accum": grad_accum, "muon_ns_dtype": optimizers[1].ns_dtype_name, **data}
    if d.is_master:
        save_model(ctx.writer, model, depth=cfg.depth)
        ctx.writer.write_json("loss_curve.json", {"train": loss_curve(state), "val_bpb": state["val"]})
    d.close()
    return metrics
