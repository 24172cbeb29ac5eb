"""How nanopipe runs on a device: which one, in what precision, compiled or not.

The one home for these choices; training (init_distributed), evaluation and every inference entry
point (the Engine, `nanopipe serve` / `chat`, the serve stage, nightly eval) ask here.

    CUDA   bf16 autocast (matmuls and attention in bf16, so the KV cache is bf16 too), TF32 for the
           matmuls autocast leaves in fp32, torch.compile for training
    CPU    fp32 throughout, eager (no native bf16 on most CPUs: autocast would only add casts)
"""

from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto': CUDA (GPU local_rank) when present, else CPU. 'cuda' without CUDA is an error."""
    if pref not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {pref!r}")
    cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is available")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def setup_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """resolve_device, made ready to run on: on CUDA, the current device and TF32 matmuls."""
    device = resolve_device(pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # fp32 matmuls (outside autocast, or ops it keeps in fp32) on tensor cores, as nanochat does
        torch.set_float32_matmul_precision("high")
    return device


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype activations are computed in: bf16 on CUDA (autocast), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast_for(device: torch.device | str, dtype: torch.dtype | None = None):
    """Autocast to `dtype` (default: compute_dtype(device)) on the device; for fp32, a no-op context."""
    device = torch.device(device)
    dtype = compute_dtype(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_enabled(setting: bool | None, device: torch.device | str) -> bool:
    """A training stage's `compile` setting: None means on with CUDA, off on CPU (where compiling
    costs minutes and gains little at our sizes)."""
    return setting if setting is not None else torch.device(device).type == "cuda"
