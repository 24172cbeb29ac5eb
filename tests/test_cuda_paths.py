"""Every CUDA-only branch, run on CPU: the decisions are tested with torch.cuda's answers faked
(is_available, set_device, get_device_name, ...), the actual GPU work is not. The engine's bf16
path itself runs on CPU in tests/test_engine.py (test_bf16_engine_*)."""

import contextlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from nanopipe import device as device_mod
from nanopipe.config import load_config
from nanopipe.data.loader import DataLoader
from nanopipe.device import autocast_for, compile_enabled, compute_dtype, resolve_device, setup_device
from nanopipe.stages.setup import environment
from nanopipe.train import common
from nanopipe.train.common import init_distributed, peak_flops, rng_state, set_rng_state


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda says a GPU is there; what nanopipe asks of it is recorded in `calls`."""
    calls = {"set_device": [], "matmul_precision": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: calls["matmul_precision"].append(p))
    return calls


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----- device choice -----

def test_auto_picks_the_local_gpu_when_there_is_one(fake_cuda):
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_cpu_without_cuda_and_cuda_without_it_is_an_error(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device=cuda was requested but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")


def test_setup_device_on_cuda_sets_the_device_and_tf32(fake_cuda):
    assert setup_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert fake_cuda == {"set_device": [torch.device("cuda", 1)], "matmul_precision": ["high"]}


def test_setup_device_on_cpu_leaves_matmul_precision_alone(monkeypatch, no_cuda):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    assert setup_device("auto") == torch.device("cpu") and calls == []


# ----- precision and compile -----

def test_compute_dtype_is_bf16_on_cuda_only():
    assert compute_dtype("cuda") == compute_dtype(torch.device("cuda", 2)) == torch.bfloat16
    assert compute_dtype("cpu") == torch.float32


def test_autocast_is_bf16_on_cuda_and_off_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build warns that CUDA autocast is disabled here
        ctx = autocast_for(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)
    assert isinstance(autocast_for("cpu"), contextlib.nullcontext)
    cpu_bf16 = autocast_for("cpu", torch.bfloat16)  # what the engine tests use to run the CUDA recipe on CPU
    assert (cpu_bf16.device, cpu_bf16.fast_dtype) == ("cpu", torch.bfloat16)
    with cpu_bf16:
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.bfloat16


def test_compile_is_on_with_cuda_unless_the_config_says_otherwise():
    assert compile_enabled(None, "cuda") and not compile_enabled(None, "cpu")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, torch.device("cuda", 0))


def test_dist_autocast_follows_its_device():
    d = common.Dist(0, 0, 1, torch.device("cpu"))
    assert isinstance(d.autocast(), contextlib.nullcontext)
    assert common.autocast_for is device_mod.autocast_for  # one home, still importable from train.common


# ----- the process group -----

@pytest.fixture
def fake_group(monkeypatch):
    calls = {"init": [], "threads": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init"].append((backend, kw)))
    monkeypatch.setattr(torch, "set_num_threads", calls["threads"].append)
    return calls


def test_init_distributed_on_gpus_uses_nccl_on_the_local_gpu(monkeypatch, fake_cuda, fake_group):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    d = init_distributed("auto")
    assert (d.rank, d.local_rank, d.world_size, d.device) == (5, 1, 8, torch.device("cuda", 1))
    assert fake_group["init"] == [("nccl", {"device_id": torch.device("cuda", 1)})]
    assert fake_cuda == {"set_device": [torch.device("cuda", 1)], "matmul_precision": ["high"]}
    assert fake_group["threads"] == []  # CPU thread sharing is for CPU ranks only


def test_init_distributed_on_cpu_uses_gloo_and_shares_the_cores(monkeypatch, no_cuda, fake_group):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common.os, "cpu_count", lambda: 16)
    d = init_distributed("auto")
    assert d.device == torch.device("cpu")
    assert fake_group["init"] == [("gloo", {"device_id": None})]
    assert fake_group["threads"] == [8]


# ----- MFU, RNG state, setup report -----

@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA GeForce RTX 4090", 165e12),
                                        ("Tesla T4", None)])
def test_peak_flops_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak


def test_peak_flops_is_unknown_on_cpu():
    assert peak_flops(torch.device("cpu")) is None


def test_checkpoints_carry_the_cuda_rng_state(monkeypatch):
    gpu_states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = rng_state()
    assert state["cuda"] is gpu_states
    set_rng_state(state)
    assert restored == [gpu_states]


def test_setup_reports_every_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 #{i}")
    env = environment()
    assert env["cuda_available"] and env["gpus"] == ["NVIDIA H100 #0", "NVIDIA H100 #1"]


# ----- the data loader's host-to-GPU copy -----

class _Bytes:
    bos_id = 256

    def encode(self, texts, prepend=None):
        return [[prepend] + list(t.encode()) for t in texts]


def test_loader_pins_batches_and_copies_them_to_the_gpu_asynchronously(tmp_path, monkeypatch):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": ["hello world, " * 20] * 8}), path, row_group_size=4)
    moves = []
    real_to = torch.Tensor.to

    def pin_memory(self):
        moves.append("pin")
        return self

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            moves.append(("to", args[0], kwargs.get("non_blocking")))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    with DataLoader([str(path)], _Bytes(), 2, 16, device="cuda:0") as loader:
        x, y = next(loader)
    assert moves == ["pin", ("to", torch.device("cuda", 0), True)]
    assert x.shape == y.shape == (2, 16) and np.array_equal(x.flatten()[1:].numpy(), y.flatten()[:-1].numpy())


# ----- the GPU presets -----

@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
def test_gpu_presets_run_every_torchrun_stage_and_the_server_on_cuda(preset):
    cfg = load_config(preset)
    for stage in ("base_train", "base_eval", "mid_train", "sft", "rl", "chat_eval"):
        section = getattr(cfg, stage)
        assert (section.device, section.nproc_per_node) == ("cuda", 8), stage
    for stage in ("base_train", "mid_train", "sft"):
        assert compile_enabled(getattr(cfg, stage).compile, "cuda"), stage
    assert cfg.serve.device == "cuda"
