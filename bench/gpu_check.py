"""The GPU check before a d20 run, in one short call: on one H100/H200 it runs what only CUDA can
show, in a few minutes, with nanopipe's own code (model, optimizers, training step, checkpoints,
engine) and no Prefect, no data, no Rust build (random tokens; a synthetic byte-pair vocabulary).
Beside a stock CUDA PyTorch it imports only wheels pip installs as they are: numpy, fsspec, pyarrow,
pydantic, safetensors, tiktoken (run it from a copy of this repository; nanopipe need not be installed).

    python bench/gpu_check.py            # CUDA when present, else the CPU path
    python bench/gpu_check.py --cpu      # the CPU path: a tiny shape, as the test suite runs it

1. base_train steps at d20's shape and device batch (sizing.GPU_RECIPES; tiny on CPU): bf16 autocast,
   torch.compile where train.common would compile; tokens/s, MFU against the GPU's dense bf16 peak
   (nanopipe/gpus.py), peak memory against nanopipe plan's estimate (sizing.train_memory). On CPU the
   peak is the resident-set growth of fresh processes training at a few small shapes, against the
   same estimator.
2. a checkpoint saved and resumed (train.common.Checkpoints): the resumed step's loss equals the
   uninterrupted one's.
3. one mid_train step (packed rows) and one SFT step (padded rows, one micro-batch with no target
   at all: its loss must be 0, not NaN) under compile as chat_sft compiles (dynamic shapes).
4. engine decode tokens/s (KV cache) at batch 1 and 32.

Last line: RESULT gpu=<> d20_tokens_per_s=<> mfu=<> peak_gb=<> plan_peak_gb=<> decode_b1=<> decode_b32=<>
(on CPU the tokens/s and memory are the tiny shape's; mfu=- there, no peak to divide by).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanopipe import gpus, sizing  # noqa: E402
from nanopipe.device import compile_enabled  # noqa: E402
from nanopipe.engine import Engine  # noqa: E402
from nanopipe.model import GPT, GPTConfig  # noqa: E402
from nanopipe.store import Store  # noqa: E402
from nanopipe.tokenizer import SPLIT_PATTERN, Tokenizer  # noqa: E402
from nanopipe.train.common import Checkpoints, init_distributed, supervised_step  # noqa: E402

GB = 1e9
# CPU: small shapes whose estimate is far above the process's own noise (torch, thread pools).
CPU_MEMORY_SHAPES = [  # depth, device batch, sequence, vocab
    (2, 16, 256, 4096),
    (4, 8, 256, 8192),
]


def byte_pair_tokenizer(vocab_size: int) -> Tokenizer:
    """A valid byte-level BPE vocabulary of vocab_size ids (the 256 bytes, then byte pairs, then the
    special tokens): what the engine needs to run, without training one."""
    n = vocab_size - 9
    ranks = {bytes([b]): b for b in range(256)}
    pairs = ((a, b) for a in range(256) for b in range(256))
    while len(ranks) < n:
        ranks[bytes(next(pairs))] = len(ranks)
    return Tokenizer(ranks, SPLIT_PATTERN)


def build(depth: int, vocab: int, T: int, head_dim: int, device: torch.device):
    mcfg = GPTConfig.from_depth(depth, vocab, T, head_dim)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    return model, model.setup_optimizers()


def random_batches(vocab: int, B: int, T: int, device, seed: int = 0, mask=None):
    """Endless (x, y) of random tokens; mask(y) may set targets to -1 (chat rows)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        t = torch.randint(0, vocab, (B, T + 1), generator=g)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if mask is not None:
            y = mask(y)
        yield x.to(device), y.to(device)


def train_steps(d, model, optimizers, fwd, batches, n: int, grad_accum: int = 1) -> list[float]:
    step = supervised_step(d, fwd, batches, grad_accum)
    losses = []
    for i in range(n):
        out = step(i)
        for o in optimizers:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return losses


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_base(d, shape: dict, steps: int) -> dict:
    """Training steps at the shape: tokens/s, MFU, peak memory vs the estimate."""
    device, cuda = d.device, d.device.type == "cuda"
    compiled = compile_enabled(None, device)
    model, optimizers = build(shape["depth"], shape["vocab"], shape["T"], shape["head_dim"], device)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    batches = random_batches(shape["vocab"], shape["B"], shape["T"], device)
    t0 = time.perf_counter()
    train_steps(d, model, optimizers, fwd, batches, 2)  # compile, allocator warm-up
    sync(device)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = train_steps(d, model, optimizers, fwd, batches, steps)
    sync(device)
    dt = time.perf_counter() - t0
    tokens_per_s = steps * shape["B"] * shape["T"] / dt
    fpt = sizing.flops_per_token(model.config)
    gpu = gpus.gpu_of(torch.cuda.get_device_name(device)) if cuda else None
    est = sizing.train_memory(model.config, shape["B"], shape["T"], 2 if cuda else 4, compiled)["total"]
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * fpt / gpu.bf16_flops if gpu else None,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None, "plan_peak_bytes": est,
            "compiled": compiled, "warmup_s": warm_s, "loss_first": losses[0], "loss_last": losses[-1],
            "model": model, "optimizers": optimizers, "fwd": fwd, "batches": batches}


def check_resume(d, shape: dict, base: dict) -> dict:
    """Save a checkpoint, take one step; load it into a fresh model and take the same step: same loss."""
    model, optimizers, device = base["model"], base["optimizers"], d.device
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Checkpoints(Store(tmp), f"{tmp}/_work", keep=1)
        t0 = time.perf_counter()
        ckpts.save(d, 1, model, optimizers, {"step": 1})
        save_s = time.perf_counter() - t0
        x, y = next(base["batches"])
        once = lambda m, f, o: train_steps(d, m, o, f, iter([(x, y)]), 1)[0]
        straight = once(model, base["fwd"], optimizers)
        fresh, fresh_opt = build(shape["depth"], shape["vocab"], shape["T"], shape["head_dim"], device)
        ckpts.load(d, 1, fresh, fresh_opt)
        fresh_fwd = torch.compile(fresh, dynamic=False) if base["compiled"] else fresh
        resumed = once(fresh, fresh_fwd, fresh_opt)
    return {"save_s": save_s, "loss": straight, "resumed_loss": resumed,
            "same": abs(resumed - straight) <= (1e-3 * abs(straight) if device.type == "cuda" else 0)}


def check_chat_steps(d, shape: dict, base: dict) -> dict:
    """One mid_train step (every target) and one SFT step (rows padded: the second half of each row
    masked; one micro-batch with no target at all) under chat_sft's compile (dynamic shapes)."""
    model, optimizers, device = base["model"], base["optimizers"], d.device
    fwd = torch.compile(model, dynamic=True) if base["compiled"] else model
    B, T, V = shape["B"], shape["T"], shape["vocab"]
    mid = train_steps(d, model, optimizers, fwd, random_batches(V, B, T, device, seed=1), 1)[0]

    def half_masked(y):
        y[:, y.shape[1] // 2:] = -1
        return y
    sft_rows = random_batches(V, 4, T // 2, device, seed=2, mask=half_masked)
    no_target = (next(sft_rows)[0], torch.full((4, T // 2), -1, dtype=torch.long, device=device))
    batches = iter([next(sft_rows), no_target])
    sft = train_steps(d, model, optimizers, fwd, batches, 1, grad_accum=2)[0]
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"mid_loss": mid, "sft_loss": sft, "weights_finite": bool(finite)}


def check_decode(model, vocab: int, new_tokens: int) -> dict:
    """Engine decode tokens/s at batch 1 and 32 (greedy, stop tokens off: exactly new_tokens each)."""
    engine = Engine(model.eval(), byte_pair_tokenizer(vocab), max_batch=32, tools=False)
    engine.stop_ids = frozenset()
    prompt = list(range(1, 17))
    rates = {}
    for rows in (1, 32):
        engine.generate_many([prompt], num_samples=rows, max_tokens=2, temperature=0)  # warm-up
        sync(engine.device)
        t0 = time.perf_counter()
        (request,) = engine.generate_many([prompt], num_samples=rows, max_tokens=new_tokens, temperature=0)
        sync(engine.device)
        rates[rows] = sum(len(t) for t in request.tokens) / (time.perf_counter() - t0)
    return {"decode_b1": rates[1], "decode_b32": rates[32]}


# ----- CPU memory: peak resident growth of a fresh process vs the estimator -----

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(depth: int, B: int, T: int, vocab: int) -> None:
    """In a fresh process: two training steps at the shape; print the resident-set growth over the
    process's state just before the model was built. The baseline is taken after one step of a tiny
    model, so that what torch loads once (kernels, autograd engine, thread pools, the optimizer's
    dtype probe) is not counted as the shape's memory."""
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    tiny, tiny_opt = build(1, 256, 8, 32, d.device)
    train_steps(d, tiny, tiny_opt, tiny, random_batches(256, 1, 8, d.device), 1)
    del tiny, tiny_opt
    before = _rss_bytes()
    model, optimizers = build(depth, vocab, T, 64, d.device)
    train_steps(d, model, optimizers, model, random_batches(vocab, B, T, d.device), 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"measured": peak - before}))


def cpu_memory_vs_estimate() -> list[dict]:
    rows = []
    for depth, B, T, vocab in CPU_MEMORY_SHAPES:
        out = subprocess.run([sys.executable, __file__, "--memory-child", f"{depth},{B},{T},{vocab}"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
        estimate = sizing.train_memory(GPTConfig.from_depth(depth, vocab, T, 64), B, T, 4, False)["total"]
        rows.append({"shape": f"d{depth} B{B} T{T} V{vocab}", "estimate": estimate, "measured": measured,
                     "error": estimate / measured - 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU path (tiny shape) even where CUDA is present")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10 on CUDA, 3 on CPU)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(*map(int, a.memory_child.split(",")))
        return
    cuda = torch.cuda.is_available() and not a.cpu
    d = init_distributed("cuda" if cuda else "cpu", threads=None if cuda else 1, seed=0)
    if cuda:
        r = sizing.GPU_RECIPES["d20"]
        shape = {"depth": r.depth, "vocab": sizing.GPU_VOCAB, "T": sizing.GPU_SEQUENCE_LEN, "head_dim": 128,
                 "B": r.device_batch_size}
        gpu_name, new_tokens = torch.cuda.get_device_name(d.device), 256
    else:
        shape = {"depth": 2, "vocab": 512, "T": 64, "head_dim": 32, "B": 4}
        gpu_name, new_tokens = "cpu", 16
    steps = a.steps or (10 if cuda else 3)
    t_start = time.perf_counter()
    print(f"gpu_check on {gpu_name}: depth {shape['depth']}, vocab {shape['vocab']:,}, device batch {shape['B']} x "
          f"{shape['T']} tokens, torch {torch.__version__}", flush=True)

    base = check_base(d, shape, steps)
    mfu = "-" if base["mfu"] is None else f"{base['mfu']:.3f}"
    print(f"[base_train] {steps} steps: {base['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, compile "
          f"{'on' if base['compiled'] else 'off'} (warm-up {base['warmup_s']:.1f}s), loss {base['loss_first']:.3f} -> "
          f"{base['loss_last']:.3f}", flush=True)
    if cuda:
        print(f"[memory] peak allocated {base['peak_bytes'] / GB:.2f} GB vs plan's estimate "
              f"{base['plan_peak_bytes'] / GB:.2f} GB ({base['plan_peak_bytes'] / base['peak_bytes'] - 1:+.0%})")
        peak_gb, plan_gb = base["peak_bytes"] / GB, base["plan_peak_bytes"] / GB
    else:
        rows = cpu_memory_vs_estimate()
        for row in rows:
            print(f"[memory] {row['shape']}: estimate {row['estimate'] / GB:.3f} GB vs measured peak "
                  f"{row['measured'] / GB:.3f} GB ({row['error']:+.0%})")
        peak_gb, plan_gb = rows[-1]["measured"] / GB, rows[-1]["estimate"] / GB

    resume = check_resume(d, shape, base)
    print(f"[checkpoint] saved in {resume['save_s']:.1f}s; resumed step loss {resume['resumed_loss']:.5f} vs "
          f"uninterrupted {resume['loss']:.5f}: {'same' if resume['same'] else 'DIFFERENT'}", flush=True)
    chat = check_chat_steps(d, shape, base)
    print(f"[chat] mid_train step loss {chat['mid_loss']:.3f}; sft step loss {chat['sft_loss']:.3f} with a "
          f"target-less micro-batch; weights finite: {chat['weights_finite']}", flush=True)
    dec = check_decode(base["model"], shape["vocab"], new_tokens)
    print(f"[engine] decode {dec['decode_b1']:,.0f} tokens/s at batch 1, {dec['decode_b32']:,.0f} at batch 32 "
          f"({new_tokens} new tokens each)")
    ok = resume["same"] and chat["weights_finite"] and all(
        v == v for v in (chat["mid_loss"], chat["sft_loss"]))  # NaN != NaN
    print(f"done in {time.perf_counter() - t_start:.0f}s: {'all checks passed' if ok else 'A CHECK FAILED'}")
    print(f"RESULT gpu={gpu_name.replace(' ', '_')} d20_tokens_per_s={base['tokens_per_s']:.0f} mfu={mfu} "
          f"peak_gb={peak_gb:.2f} plan_peak_gb={plan_gb:.2f} decode_b1={dec['decode_b1']:.0f} "
          f"decode_b32={dec['decode_b32']:.0f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
