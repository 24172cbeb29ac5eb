"""Pretraining throughput: tokens/s, model FLOP/s and MFU of a full optimizer step (forward, backward,
Muon + AdamW), for the tiny and cpu presets' models and for the shapes of ANCHORS.md, on this machine.

    python bench/train.py [--steps 6] [--device cpu|cuda] [--shapes tiny,cpu,anchor4,anchor6,d20] [--system-malloc]

MFU needs a peak: on CUDA the device's dense bf16 peak (nanopipe.train.common.PEAK_FLOPS); on CPU
the fp32 matmul FLOP/s measured here first (a large torch.mm), stated in the output.
It runs with the malloc settings base_train's processes get (nanopipe.launch.MALLOC_ENV), re-executing
itself to apply them; --system-malloc measures glibc's defaults instead.
Last line: RESULT preset=cpu device=<> tokens_per_s=<> mfu=<>
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from nanopipe.config import load_config
from nanopipe.launch import MALLOC_ENV, training_env
from nanopipe.model import GPT, GPTConfig
from nanopipe.train.common import peak_flops

# nanochat's measurements on this machine type (ANCHORS.md): tokens/s, model TFLOP/s
ANCHORS = {"anchor4": (3820, 0.108), "anchor6": (1500, 0.131)}


def shapes() -> dict[str, dict]:
    out = {}
    for preset in ("tiny", "cpu"):
        c = load_config(preset).base_train
        out[preset] = dict(depth=c.depth, head_dim=c.head_dim, seq=c.sequence_len, rows=c.device_batch_size,
                           batch=c.total_batch_size, vocab=load_config(preset).tokenizer.vocab_size)
    out["anchor4"] = dict(depth=4, head_dim=64, seq=256, rows=8, batch=2048, vocab=8192)
    out["anchor6"] = dict(depth=6, head_dim=64, seq=512, rows=32, batch=16384, vocab=8192)
    c = load_config("d20").base_train
    out["d20"] = dict(depth=20, head_dim=128, seq=2048, rows=c.device_batch_size, batch=c.device_batch_size * 2048,
                      vocab=65536)
    return out


def cpu_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best of 3 timings of `reps` fp32 n^3 matmuls (best: this machine's speed drifts)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best


def measure(s: dict, steps: int, device: torch.device, compile_: bool) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(s["depth"], s["vocab"], s["seq"], s["head_dim"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    opts = model.setup_optimizers()
    fwd = torch.compile(model) if compile_ else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    accum = max(1, s["batch"] // (s["rows"] * s["seq"]))
    x = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)
    y = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)

    def step():
        for _ in range(accum):
            with autocast:
                loss = fwd(x, y)
            (loss / accum).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):  # warm-up (allocations, compile)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    tokens = accum * s["rows"] * s["seq"]
    return {"params": model.num_params(), "flops_per_token": model.estimate_flops(), "step_s": dt,
            "tokens_per_s": tokens / dt, "flops_per_s": tokens / dt * model.estimate_flops()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="tiny,anchor4,anchor6,cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (default on CUDA)")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc settings, not MALLOC_ENV")
    a = ap.parse_args()
    missing = {} if a.system_malloc else training_env()
    if missing:  # glibc reads them at start-up: re-execute with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})
    device = torch.device(a.device)
    compile_ = a.compile or device.type == "cuda"
    if device.type == "cpu":
        peak, peak_what = cpu_matmul_peak(), "measured fp32 torch.mm 2048^3 on this CPU"
    else:
        peak, peak_what = peak_flops(device), f"dense bf16 peak of {torch.cuda.get_device_name(device)}"
    malloc = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc defaults"
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | malloc: {malloc} | "
          f"peak {peak / 1e12:.3f} TFLOP/s ({peak_what})" if peak else f"device {device} | peak unknown")
    all_shapes = shapes()
    results = {}
    for name in a.shapes.split(","):
        s = all_shapes[name]
        r = measure(s, a.steps, device, compile_)
        results[name] = r
        line = (f"{name:<8} depth {s['depth']:>2} dim {64 * s['depth']:>4} seq {s['seq']:>4} batch {s['batch']:>6} "
                f"vocab {s['vocab']:>6} | {r['params'] / 1e6:7.2f}M params {r['flops_per_token'] / 1e6:8.1f}M FLOP/tok | "
                f"{r['tokens_per_s']:>9,.0f} tok/s {r['flops_per_s'] / 1e12:7.3f} TFLOP/s")
        if peak:
            line += f" MFU {100 * r['flops_per_s'] / peak:5.1f}%"
        if name in ANCHORS and device.type == "cpu":
            tps, tflops = ANCHORS[name]
            line += f" | vs nanochat {tflops:.3f} TFLOP/s: {r['flops_per_s'] / 1e12 / tflops:.2f}x"
        print(line, flush=True)
    key = "cpu" if "cpu" in results else next(iter(results))
    r = results[key]
    mfu = r["flops_per_s"] / peak if peak else float("nan")
    print(f"RESULT preset={key} device={device.type} tokens_per_s={r['tokens_per_s']:.0f} mfu={mfu:.4f}")


if __name__ == "__main__":
    main()
