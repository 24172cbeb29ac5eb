"""Strict collectives: make gloo raise where NCCL would.

NCCL needs every tensor handed to a collective to be contiguous, and of the same shape and
dtype on every rank. gloo lets some of that through (a transposed view, say), so multi-rank
tests on CPU can pass code that dies at the first step on GPUs. install() wraps
torch.distributed's tensor collectives: before each call, every rank shares what it passes
(all_gather_object, on the collective's own group), and all ranks raise the same error when a
tensor is not contiguous or the ranks disagree, so none is left waiting in the collective.

With NANOPIPE_STRICT_COLLECTIVES=1 (STRICT_ENV) in the environment, init_distributed installs it
(install_if_requested): the test suite sets it, and its torchrun children inherit it; the tests'
own spawned workers call install_if_requested themselves. It costs one extra round trip per
collective: for tests.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import torch.distributed as dist

# name -> whether the ranks must pass the same shapes and dtypes (False: uneven splits or
# rank-specific lists are legal there, so only contiguity is checked)
COLLECTIVES = {
    "all_reduce": True, "broadcast": True, "reduce": True, "all_gather": True, "all_gather_into_tensor": True,
    "all_gather_single": True, "reduce_scatter": True, "reduce_scatter_tensor": True,
    "reduce_scatter_single": True, "all_to_all": False, "all_to_all_single": False, "gather": False,
    "scatter": False,
}  # not send/recv: only two ranks take part, so there is no group-wide exchange to piggyback on


STRICT_ENV = "NANOPIPE_STRICT_COLLECTIVES"


class CollectiveError(RuntimeError):
    """A collective got tensors that NCCL would reject."""


def _describe(bound: inspect.BoundArguments) -> list[tuple]:
    """(argument, shape, dtype, contiguous) of every tensor argument, lists item by item."""
    out = []
    for name, value in bound.arguments.items():
        items = [(name, value)] if isinstance(value, torch.Tensor) else (
            [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
            if isinstance(value, (list, tuple)) else [])
        out += [(arg, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_contiguous()) for arg, t in items]
    return out


def _check(name: str, same_on_all_ranks: bool, gathered: list[list[tuple]]) -> None:
    for rank, tensors in enumerate(gathered):
        for arg, shape, dtype, contiguous in tensors:
            if not contiguous:
                raise CollectiveError(f"dist.{name}: {arg} on rank {rank} ({dtype}, shape {list(shape)}) is not "
                                      "contiguous; NCCL raises 'Tensors must be contiguous' (call .contiguous())")
    if same_on_all_ranks:
        specs = [[t[:3] for t in tensors] for tensors in gathered]
        if any(s != specs[0] for s in specs):
            per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{a} {d}{list(s)}" for a, s, d in spec)
                                 for r, spec in enumerate(specs))
            raise CollectiveError(f"dist.{name}: the ranks pass different tensors ({per_rank}); "
                                  "NCCL needs the same shapes and dtypes on every rank")


def strict(name: str, fn):
    """`fn` (a torch.distributed collective) checked on every rank before it runs."""
    signature = inspect.signature(fn)
    same_on_all_ranks = COLLECTIVES[name]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, _describe(bound), group=group)
        _check(name, same_on_all_ranks, gathered)
        return fn(*args, **kwargs)

    wrapper.strict = True
    return wrapper


def install() -> None:
    """Replace torch.distributed's collectives by their strict versions (idempotent). Only calls
    through the module (`dist.all_reduce(...)`) are checked, which is how nanopipe calls them."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "strict", False):
            setattr(dist, name, strict(name, fn))


def installed() -> bool:
    return getattr(dist.all_reduce, "strict", False)


def install_if_requested() -> None:
    """install() when STRICT_ENV is "1" in this process's environment."""
    if os.environ.get(STRICT_ENV) == "1":
        install()
