"""Pretraining throughput on this machine: tokens/s, model FLOP/s and MFU of a full optimizer step
(forward, backward, gradient clipping, Muon + AdamW), side by side with nanochat's own code.

    python bench/train.py [--shapes cpu] [--rounds 3] [--steps 1] [--nanochat DIR] [--device cpu|cuda]
                          [--system-malloc]

Contenders, at each shape the same model size, batch and random tokens:
  nanopipe           Muon's Newton-Schulz in the dtype picked for this device (nanopipe.optim.fast_ns_dtype),
                     as base_train runs it: "after"
  nanopipe-bf16-ns   the same model and optimizers with Newton-Schulz in bf16, as before the pick: "before"
                     (measured only where the pick is not bf16)
  nanochat           nanochat's GPT, setup_optimizers and base_train step body, in its own process
                     (bench/nanochat_step.py), when --nanochat DIR or $NANOCHAT_DIR names a checkout, or a
                     git directory of nanochat from which --nanochat-rev (default: the classic 790f3be, the
                     recipe nanopipe follows) is extracted to a temporary directory. Without it the
                     comparison is skipped, with a line saying so.
Timed rounds alternate A B C A B C (the machine's speed drifts; other work hits all alike); step times
are medians over rounds. In each turn one untimed step comes first: after its turn a contender hands its
freed heap back to the system (malloc_trim), so that two resident training processes of this size fit a
small machine, and the untimed step faults it in again. Each side counts its own model FLOPs per token (6 x matmul
weights + attention, the same formula). MFU needs a peak: on CUDA the device's dense bf16 peak, on CPU
the fp32 matmul FLOP/s measured here first (a large torch.mm), stated in the output. It also times
Newton-Schulz alone on a 4x256x1024 stack in bf16 and fp32.
It runs with the environment base_train's processes get (nanopipe.launch.training_env: glibc malloc
settings), re-executing itself to apply them; --system-malloc measures glibc's defaults instead.
Last line: RESULT preset=cpu device=<> tokens_per_s=<> mfu=<> bf16_ns_tokens_per_s=<> nanochat_tokens_per_s=<>
vs_nanochat=<x>
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanopipe.config import load_config  # noqa: E402
from nanopipe.launch import MALLOC_ENV, training_env  # noqa: E402
from nanopipe.model import GPT, GPTConfig  # noqa: E402
from nanopipe.optim import dtype_name, fast_ns_dtype, zeropower_via_newtonschulz5  # noqa: E402
from nanopipe.train.common import autocast_for, peak_flops, set_schedule  # noqa: E402

NANOCHAT_CLASSIC = "790f3be"
NANOCHAT_STEP = Path(__file__).with_name("nanochat_step.py")


def shapes() -> dict[str, dict]:
    out = {}
    for preset in ("tiny", "cpu"):
        c = load_config(preset).base_train
        out[preset] = dict(depth=c.depth, head_dim=c.head_dim, seq=c.sequence_len, rows=c.device_batch_size,
                           batch=c.total_batch_size, vocab=load_config(preset).tokenizer.vocab_size)
    out["d4"] = dict(depth=4, head_dim=64, seq=256, rows=8, batch=2048, vocab=8192)  # ANCHORS.md's first row
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


def newton_schulz_seconds(dtype: torch.dtype, device: torch.device, shape=(4, 256, 1024)) -> float:
    G = torch.randn(shape, device=device)
    zeropower_via_newtonschulz5(G, dtype=dtype)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        zeropower_via_newtonschulz5(G, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def release_heap() -> None:
    """Return freed heap memory to the system (glibc; training_env's malloc settings keep it otherwise)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim:
        trim(0)


class NanopipeStep:
    """nanopipe's model and optimizers at a shape, stepped as train_loop steps them."""

    def __init__(self, s: dict, device: torch.device, compile_: bool):
        torch.manual_seed(0)
        with torch.device("meta"):
            self.model = GPT(GPTConfig.from_depth(s["depth"], s["vocab"], s["seq"], s["head_dim"]))
        self.model.to_empty(device=device)
        self.model.init_weights(seed=0)
        self.optimizers = self.model.setup_optimizers()
        self.fwd = torch.compile(self.model, dynamic=False) if compile_ else self.model
        self.device = device
        self.accum = max(1, s["batch"] // (s["rows"] * s["seq"]))
        self.x = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)
        self.y = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)
        self.info = {"params": self.model.num_params(), "flops_per_token": self.model.estimate_flops(),
                     "tokens_per_step": self.accum * s["rows"] * s["seq"]}

    def step(self) -> None:
        for _ in range(self.accum):
            with autocast_for(self.device):
                loss = self.fwd(self.x, self.y)
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        set_schedule(self.optimizers, 1.0, 300)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        loss.item()

    def timed(self, steps: int, ns_dtype: torch.dtype) -> float:
        """Seconds per step of `steps` steps, after an untimed one; then the freed heap goes back."""
        self.optimizers[1].ns_dtype = ns_dtype
        self.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        dt = (time.perf_counter() - t0) / steps
        release_heap()
        return dt


class NanochatStep:
    """nanochat's step in its own process (bench/nanochat_step.py), driven over a pipe."""

    def __init__(self, checkout: Path, s: dict, device: torch.device):
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(NANOCHAT_STEP), "--nanochat", str(checkout),
                                      "--shape", json.dumps(s), "--device", device.type],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError("nanochat's step failed:\n" + self.err.read()[-3000:])
        return json.loads(line)

    def timed(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._answer()["step_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.err.close()


def nanochat_checkout(source: str | None, rev: str, tmp: Path) -> Path | None:
    """A directory holding nanochat/: `source` itself, or `rev` extracted from the git directory `source`."""
    if not source:
        return None
    path = Path(source)
    if (path / "nanochat" / "gpt.py").is_file():
        return path
    archive = subprocess.run(["git", "--git-dir", str(path), "archive", rev, "nanochat"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--nanochat {source}: neither a nanochat checkout (no nanochat/gpt.py) nor a git directory "
                         f"holding {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp


def compare(name: str, s: dict, a, device: torch.device, compile_: bool, checkout: Path | None, peak) -> dict:
    """Alternating rounds of every contender at one shape; prints a line each and the ratios."""
    print(f"{name}: depth {s['depth']} dim {64 * s['depth']} seq {s['seq']} batch {s['batch']:,} tokens "
          f"vocab {s['vocab']} | {a.rounds} rounds x {a.steps} steps, alternating", flush=True)
    picked = fast_ns_dtype(device.type)[0]
    ours = NanopipeStep(s, device, compile_)
    contenders = {"nanopipe": lambda n: ours.timed(n, picked)}
    if picked != torch.bfloat16:
        contenders["nanopipe-bf16-ns"] = lambda n: ours.timed(n, torch.bfloat16)
    info = {k: ours.info for k in contenders}
    nanochat = NanochatStep(checkout, s, device) if checkout else None
    if nanochat:
        contenders["nanochat"] = nanochat.timed
        info["nanochat"] = nanochat.info
    try:
        times = {k: [] for k in contenders}
        for i in range(a.rounds):
            for k, timed in contenders.items():
                times[k].append(timed(a.steps))
            print(f"  round {i + 1}/{a.rounds}: " + ", ".join(f"{k} {t[-1]:.2f} s/step" for k, t in times.items()),
                  flush=True)
    finally:
        if nanochat:
            nanochat.close()
    results = {}
    for k, ts in times.items():
        step_s = statistics.median(ts)
        tps = info[k]["tokens_per_step"] / step_s
        r = results[k] = {**info[k], "step_s": step_s, "tokens_per_s": tps,
                          "flops_per_s": tps * info[k]["flops_per_token"]}
        line = (f"  {k:<17} {r['params'] / 1e6:6.2f}M params {r['flops_per_token'] / 1e6:6.1f}M FLOP/tok | "
                f"{step_s:7.2f} s/step {tps:>9,.0f} tok/s {r['flops_per_s'] / 1e12:6.3f} TFLOP/s")
        if peak:
            line += f" MFU {100 * r['flops_per_s'] / peak:5.1f}%"
        print(line + f" | rounds {' '.join(f'{t:.2f}' for t in ts)} s", flush=True)
    after = results["nanopipe"]
    if "nanopipe-bf16-ns" in results:
        print(f"  after/before (Newton-Schulz {dtype_name(picked)} vs bf16): "
              f"{after['tokens_per_s'] / results['nanopipe-bf16-ns']['tokens_per_s']:.2f}x tokens/s")
    if "nanochat" in results:
        nc = results["nanochat"]
        line = (f"  vs nanochat: {after['tokens_per_s'] / nc['tokens_per_s']:.2f}x tokens/s, "
                f"{after['flops_per_s'] / nc['flops_per_s']:.2f}x model FLOP/s")
        if "nanopipe-bf16-ns" in results:
            line += f" (before: {results['nanopipe-bf16-ns']['tokens_per_s'] / nc['tokens_per_s']:.2f}x tokens/s)"
        print(line, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="cpu", help=f"comma-separated, of: {', '.join(shapes())}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per contender per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile nanopipe's model (default on CUDA)")
    ap.add_argument("--nanochat", default=os.environ.get("NANOCHAT_DIR"),
                    help="nanochat checkout or git directory (default: $NANOCHAT_DIR)")
    ap.add_argument("--nanochat-rev", default=NANOCHAT_CLASSIC, help="commit to extract from a git directory")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc settings, not MALLOC_ENV")
    a = ap.parse_args()
    all_shapes = shapes()
    unknown = [n for n in a.shapes.split(",") if n not in all_shapes]
    if unknown or a.rounds < 1 or a.steps < 1:
        ap.error(f"unknown shape(s) {unknown}; choose from {', '.join(all_shapes)}" if unknown
                 else "--rounds and --steps must be >= 1")
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
          + (f"peak {peak / 1e12:.3f} TFLOP/s ({peak_what})" if peak else "peak unknown"))
    dtype, why = fast_ns_dtype(device.type)
    print(f"Newton-Schulz dtype picked: {dtype_name(dtype)}: {why}")
    ns = {d: newton_schulz_seconds(d, device) for d in (torch.bfloat16, torch.float32)}
    print(f"Newton-Schulz 4x256x1024, 5 steps: bf16 {ns[torch.bfloat16]:.3f} s, fp32 {ns[torch.float32]:.3f} s "
          f"(bf16/fp32 {ns[torch.bfloat16] / ns[torch.float32]:.1f}x)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        checkout = nanochat_checkout(a.nanochat, a.nanochat_rev, Path(tmp))
        if checkout:
            print(f"nanochat: {checkout}" + (f" ({a.nanochat_rev} from {a.nanochat})" if checkout == Path(tmp) else ""))
        else:
            print("nanochat: comparison skipped (no checkout: pass --nanochat DIR or set NANOCHAT_DIR)")
        results = {name: compare(name, all_shapes[name], a, device, compile_, checkout, peak)
                   for name in a.shapes.split(",")}

    key = "cpu" if "cpu" in results else next(iter(results))
    r = results[key]
    line = (f"RESULT preset={key} device={device.type} tokens_per_s={r['nanopipe']['tokens_per_s']:.0f} "
            f"mfu={r['nanopipe']['flops_per_s'] / peak if peak else float('nan'):.4f}")
    if "nanopipe-bf16-ns" in r:
        line += f" bf16_ns_tokens_per_s={r['nanopipe-bf16-ns']['tokens_per_s']:.0f}"
    if "nanochat" in r:
        line += (f" nanochat_tokens_per_s={r['nanochat']['tokens_per_s']:.0f} "
                 f"vs_nanochat={r['nanopipe']['tokens_per_s'] / r['nanochat']['tokens_per_s']:.2f}")
    print(line)


if __name__ == "__main__":
    main()
