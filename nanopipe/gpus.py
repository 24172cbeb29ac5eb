"""The accelerators nanopipe knows: memory and dense bf16 peak FLOP/s, the one table of them (MFU in
the training log, `nanopipe plan`'s memory budget and time, bench/gpu_check.py). Prices per GPU-hour
are in nanopipe/report.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    key: str
    match: tuple[str, ...]  # all of these appear in torch.cuda.get_device_name()
    memory_gib: float
    bf16_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, FLOP/s: MFU's denominator


# Most specific first: the first entry whose `match` strings all occur in a device name is it.
GPU_TABLE = (
    GPU("h100-pcie", ("H100", "PCIe"), 80, 756e12),
    GPU("h100-80gb", ("H100",), 80, 989e12),  # SXM
    GPU("h200", ("H200",), 141, 989e12),
    GPU("b200", ("B200",), 180, 2250e12),
    GPU("a100-40gb", ("A100", "40GB"), 40, 312e12),
    GPU("a100-80gb", ("A100",), 80, 312e12),
    GPU("l40s", ("L40S",), 48, 362e12),
    GPU("l4", ("L4",), 24, 121e12),
    GPU("a10g", ("A10G",), 24, 70e12),
    GPU("a10", ("A10",), 24, 125e12),
    GPU("4090", ("4090",), 24, 165e12),
    GPU("v100", ("V100",), 16, 125e12),  # fp16: V100 has no bf16 units
)
GPUS = {g.key: g for g in GPU_TABLE}


def gpu_of(device_name: str) -> GPU | None:
    """The table entry of a CUDA device name (torch.cuda.get_device_name), or None."""
    return next((g for g in GPU_TABLE if all(m in device_name for m in g.match)), None)
