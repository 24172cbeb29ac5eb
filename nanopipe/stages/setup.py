"""Stage 1: environment report — versions, CPU/GPU, the rustbpe build, store reachability."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1

_PACKAGES = ("torch", "prefect", "tiktoken", "pyarrow", "fsspec", "s3fs", "pydantic", "fastapi", "uvicorn", "numpy")


def environment() -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": {},
    }
    for name in _PACKAGES:
        try:
            env["packages"][name] = md.version(name)
        except md.PackageNotFoundError:
            env["packages"][name] = None
    try:
        import nanopipe_bpe

        env["rustbpe"] = {"module": nanopipe_bpe.__name__, "file": nanopipe_bpe.__file__,
                          "version": md.version("nanopipe-bpe")}
    except (ImportError, md.PackageNotFoundError) as e:
        env["rustbpe"] = {"error": f"{e}; run `make setup` to build rustbpe"}
    return env


def run(ctx: "StageContext") -> dict:
    env = environment()
    if ctx.config.check_store:
        env["store"] = {"url": ctx.store.url, "roundtrip_s": round(ctx.store.check_writable(), 4)}
    ctx.writer.write_json("env.json", env)
    gpus = env["gpus"]
    ctx.log(f"[setup] python {env['python']} | torch {env['packages']['torch']} | "
            f"{len(gpus)} GPU(s) {', '.join(gpus)} | {env['cpu_count']} CPUs | rustbpe: "
            f"{env['rustbpe'].get('version') or env['rustbpe'].get('error')}")
    if "error" in env["rustbpe"]:
        raise RuntimeError(f"rustbpe is not usable: {env['rustbpe']['error']}")
    return {"cuda": env["cuda_available"], "gpus": len(gpus), "cpus": env["cpu_count"],
            "torch": env["packages"]["torch"]}
