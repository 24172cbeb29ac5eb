"""Sizes before a run: parameters, FLOPs per token, peak memory per GPU, device batch and gradient
accumulation, steps, and the tokens a data source holds, as arithmetic on plain numbers.

The training stages use it (batch checks, `device_batch_size=auto`), and so do `nanopipe plan`
(nanopipe/plan.py) and bench/gpu_check.py. It imports neither torch nor pydantic, so it loads on
any machine. Model shapes are read duck-typed from a nanopipe.model.GPTConfig (n_layer, n_embd,
n_head, n_kv_head, head_dim, vocab_size, padded_vocab_size). The accelerators' memory and peak
FLOP/s are in nanopipe/gpus.py, prices per GPU-hour in nanopipe/report.py: this module is part of
the training stages' code identity, and neither a new GPU nor a new price may rebuild a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

GiB = 1 << 30


class SizingError(ValueError):
    """A configuration that cannot run at these sizes: a batch that does not split into micro-batches,
    no device batch that fits, more tokens to read than the data holds. The message names what to change."""


# ----- nanochat's GPU recipes (speedrun.sh, run1000.sh, README "Bigger models"; classic 790f3be) -----

@dataclass(frozen=True)
class Recipe:
    depth: int
    device_batch_size: int  # rows per GPU that fit 80 GB (nanochat: 32, halved for d26, 8 for d32)
    fineweb_files: int  # FineWeb-EDU files: 20 tokens/param x 4.8 chars/token / 250M chars a file, rounded up


GPU_RECIPES = {"d20": Recipe(20, 32, 240), "d26": Recipe(26, 16, 450), "d32": Recipe(32, 8, 800)}
GPU_VOCAB = 65_536
GPU_SEQUENCE_LEN = 2048
TOTAL_BATCH_TOKENS = 524_288  # base and mid training's tokens per optimizer step (2**19)


# ----- data: how many tokens a source holds, before a tokenizer exists -----

# nanochat's repackaging closes a FineWeb-EDU file once it holds >= 250M chars (a lower bound).
FINEWEB_EDU_CHARS_PER_FILE = 250_000_000
# Characters of the offline sample's parts (nanopipe.data.offline_packages), measured once.
SAMPLE_PART_CHARS = {"wiki": 4_875_024, "shakespeare": 5_057_197, "kjv": 4_233_262}
# Characters per token, for estimates only (base_train measures the real figure with the real
# tokenizer): nanochat's tok_eval on FineWeb-EDU at 65,536; ours on the sample at 4,096 (3.39;
# 3.80 at 8,192), the lower, so the estimate errs towards too few tokens.
CHARS_PER_TOKEN = {"fineweb-edu": 4.8, "sample": 3.39}


def source_chars(kind: str, num_files: int = 1, sample_parts: Iterable[str] = (), max_chars: int | None = None) -> int | None:
    """Characters a text source yields (None: unknown before reading it, e.g. the user's own files)."""
    if kind == "fineweb-edu":
        chars = num_files * FINEWEB_EDU_CHARS_PER_FILE
    elif kind == "sample":
        chars = sum(SAMPLE_PART_CHARS[p] for p in sample_parts)
    else:
        chars = None
    if max_chars is not None:
        chars = max_chars if chars is None else min(chars, max_chars)
    return chars


# ----- the model -----

def matrix_params(c) -> int:
    """Parameters of the Transformer blocks' matrices (Muon's)."""
    kv = c.n_kv_head * c.head_dim
    return c.n_layer * (2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv + 8 * c.n_embd * c.n_embd)


def num_params(c) -> int:
    """All parameters: embedding, blocks, lm_head (rows padded to padded_vocab_size)."""
    return c.vocab_size * c.n_embd + matrix_params(c) + c.padded_vocab_size * c.n_embd


def flops_per_token(c, sequence_len: int | None = None) -> int:
    """Training FLOPs per token (nanopipe.model.GPT.estimate_flops): 6 per matmul weight plus
    causal attention over the sequence."""
    T = c.sequence_len if sequence_len is None else sequence_len
    return 6 * (num_params(c) - c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_head * c.head_dim * T


# ----- memory per rank -----

def optimizer_bytes(c) -> int:
    """nanopipe.optim's state: AdamW's two fp32 moments for wte and lm_head, Muon's fp32 momentum for
    the matrices; not sharded (every rank holds the whole state, see optim.py)."""
    n_matrix = matrix_params(c)
    return 8 * (num_params(c) - n_matrix) + 4 * n_matrix


def train_memory(c, B: int, T: int, compute_bytes: int = 4, compiled: bool = False) -> dict[str, int]:
    """Peak bytes per rank of a training step of nanopipe.model.GPT with nanopipe.optim's optimizers,
    B rows of T tokens per micro-batch. compute_bytes: 4 = fp32 (CPU), 2 = bf16 autocast (CUDA).

    - params, grads: fp32 (the model keeps fp32 weights; autocast casts them per matmul).
    - optimizer: AdamW's two fp32 moments for wte and lm_head, Muon's fp32 momentum for the
      matrices; neither is sharded (every rank holds the whole state, see optim.py).
    - weights_lowp: eager autocast keeps its bf16 copies of the matrices and lm_head until backward.
    - activations: what each block saves for backward (eager: the residual stream and norm inputs
      in fp32; the matmul inputs, q/k before and after their norm, v, attention output, ReLU and
      its square; compiled: what Inductor must keep, the rest recomputed: the two residuals, c_q/c_k/
      c_v and attention outputs, c_fc's output), plus the final norm and lm_head inputs.
    - logits: eager keeps the fp32 softcapped logits and log-softmax for backward, and at the start
      of backward their two gradients live too: 4 fp32 copies of (B*T, vocab); compiled: the
      lm_head output and its gradient in the compute dtype (softcap and cross-entropy fused).
    The forward/backward peak (all activations live at the start of backward) is compared with the
    optimizer step's (stacked gradients and Newton-Schulz work); the larger is `total`. No CUDA
    context, workspaces or fragmentation: see memory_budget.
    """
    if B < 1 or T < 1:
        raise ValueError(f"batch and sequence length must be >= 1, got B={B}, T={T}")
    a, f = compute_bytes, 4
    autocast = compute_bytes < 4
    M, C, L = B * T, c.n_embd, c.n_layer
    kv = c.n_kv_head * c.head_dim / C  # kv width relative to C
    n_matrix, n_all = matrix_params(c), num_params(c)
    lm_head = c.padded_vocab_size * C
    params = grads = 4 * n_all
    optimizer = optimizer_bytes(c)
    if compiled:
        per_token_layer = C * (2 * f + a * (2 + 2 * kv + 4))  # x, x' fp32; q, out, k, v, c_fc out
        final = M * C * (f + a)
        logits = 2 * a * M * c.padded_vocab_size
        weights_lowp = 0
    else:
        norm_inputs = 4 * a if autocast else 2 * f  # autocast casts norm(x) once per matmul (q, k, v; c_fc)
        per_token_layer = C * (2 * f + norm_inputs + a * (4 + 3 * kv + 8))
        final = M * C * (f + (a if autocast else f))
        logits = 4 * 4 * M * c.vocab_size
        weights_lowp = 2 * (n_matrix + lm_head) if autocast else 0
    activations = int(L * M * per_token_layer) + final
    fixed = params + grads + optimizer
    fwd_bwd = fixed + weights_lowp + activations + logits
    largest_group = max(C * C, 4 * C * C)  # c_fc / mlp c_proj shape group, per layer
    step = fixed + 4 * n_matrix + 8 * L * largest_group  # stacked grads (DistMuon: all groups) + NS work
    return {"params": params, "grads": grads, "optimizer": optimizer, "weights_lowp": weights_lowp,
            "activations": activations, "logits": logits, "total": max(fwd_bwd, step)}


def eval_memory(c, B: int, T: int, compute_bytes: int = 4) -> dict[str, int]:
    """Peak bytes per rank of a no-grad forward (base_eval's bits per byte): the weights (and autocast's
    bf16 copies), one block's widest temporaries, and 3 fp32 copies of the logits (lm_head output,
    softcap, log-softmax)."""
    M, C = B * T, c.n_embd
    params = 4 * num_params(c)
    weights_lowp = 2 * (matrix_params(c) + c.padded_vocab_size * C) if compute_bytes < 4 else 0
    activations = 3 * 4 * M * C * compute_bytes
    logits = 3 * 4 * M * c.padded_vocab_size
    return {"params": params, "weights_lowp": weights_lowp, "activations": activations, "logits": logits,
            "total": params + weights_lowp + activations + logits}


HEADROOM = 0.10  # of device memory, for fragmentation and allocator rounding


def memory_budget(device_bytes: int) -> int:
    """Bytes an estimate may use on a device of device_bytes: 10% headroom and 1 GiB for the CUDA
    context, cuBLAS/NCCL workspaces and the compile caches."""
    return int(device_bytes * (1 - HEADROOM)) - GiB


def fit_device_batch(candidates: Iterable[int], need: Callable[[int], int], budget: int) -> int | None:
    """The largest candidate device batch whose estimated peak (need(B) bytes) fits budget; None if none does."""
    fitting = [b for b in candidates if need(b) <= budget]
    return max(fitting) if fitting else None


CPU_AUTO_MAX_ROWS = 32  # nanochat's default device batch; more rows gain a CPU nothing
EVAL_DEVICE_BATCHES = [1 << i for i in range(9)]  # base_eval's auto picks among these (no step to keep whole)


def cpu_memory_budget(physical_bytes: int) -> int:
    """On CPU, "auto" may use a quarter of physical memory (the machine is shared with the loader,
    other ranks and whatever else runs)."""
    return physical_bytes // 4


def auto_device_batch(stage: str, candidates: list[int], need: Callable[[int], int], budget: int, where: str,
                      cpu: bool = False) -> int:
    """device_batch_size=auto: the largest candidate whose estimate fits budget (on CPU: at most
    CPU_AUTO_MAX_ROWS rows); a SizingError naming the stage when not even the smallest fits."""
    if cpu:
        candidates = [b for b in candidates if b <= CPU_AUTO_MAX_ROWS] or [min(candidates)]
    pick = fit_device_batch(candidates, need, budget)
    if pick is None:
        smallest = min(candidates)
        raise SizingError(f"{stage}.device_batch_size=auto: even {smallest} row(s) need about "
                         f"{need(smallest) / GiB:.1f} GiB, more than the {budget / GiB:.1f} GiB usable on {where}; "
                         "use more GPUs, a smaller model or shorter sequences")
    return pick


def divisors(n: int) -> list[int]:
    """Device batches that divide n rows evenly (ascending)."""
    return [d for d in range(1, n + 1) if n % d == 0]


# ----- batches and steps -----

def grad_accum(total: int, per_micro: int, total_name: str, micro_what: str) -> int:
    """Micro-batches per optimizer step: total / per_micro, which must divide; else a SizingError
    naming the fields, e.g. grad_accum(524288, 32*2048*3, "mid_train.total_batch_size",
    "device_batch_size x max_seq_len x ranks (32 x 2048 x 3)")."""
    if per_micro < 1 or total % per_micro:
        raise SizingError(f"{total_name} ({total:,}) must be a multiple of {micro_what} = {per_micro:,}")
    return total // per_micro


def token_grad_accum(stage: str, total: int, B: int, T: int, world: int, seq_field: str) -> int:
    """Micro-batches per step of a stage whose step is `total` tokens (base_train, mid_train)."""
    return grad_accum(total, B * T * world, f"{stage}.total_batch_size",
                      f"{stage}.device_batch_size x {seq_field} x ranks ({B} x {T} x {world})")


def row_grad_accum(stage: str, target: int, B: int, world: int) -> int:
    """Micro-batches per step of a stage whose step is `target` conversations (sft)."""
    return grad_accum(target, B * world, f"{stage}.target_examples_per_step",
                      f"{stage}.device_batch_size x ranks ({B} x {world})")


def base_steps(num_iterations: int, target_flops: float, param_data_ratio: float, params: int,
               flops_per_token: float, total_batch_size: int) -> int:
    """base_train's horizon: explicit, else from a FLOP budget, else tokens per parameter (Chinchilla: 20)."""
    if num_iterations > 0:
        return num_iterations
    if target_flops > 0:
        return max(1, round(target_flops / (flops_per_token * total_batch_size)))
    return max(1, round(param_data_ratio * params / total_batch_size))


def mid_steps(mixture_tokens: int, total_batch_size: int, num_iterations: int = -1) -> int:
    """mid_train's steps: explicit, else one epoch of the packed mixture at total_batch_size tokens a step."""
    return num_iterations if num_iterations > 0 else max(1, mixture_tokens // total_batch_size)


def sft_steps(conversations: int, examples_per_step: int, num_iterations: int = -1) -> int:
    """SFT's steps: explicit, else one epoch at examples_per_step conversations a step (nanochat:
    len(train_ds) // target_examples_per_step)."""
    return num_iterations if num_iterations > 0 else max(1, conversations // examples_per_step)
