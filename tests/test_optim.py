import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanopipe import distcheck, optim
from nanopipe.model import GPT, GPTConfig
from nanopipe.optim import DistAdamW, DistMuon, Muon, setup_optimizers, zeropower_via_newtonschulz5

CONFIG = GPTConfig(sequence_len=16, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)


def make_model(seed: int = 0) -> GPT:
    model = GPT(CONFIG)
    model.init_weights(seed=seed)
    return model


def train_step(model, optimizers, x, y):
    model(x, y).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def spectrum_matrix(rows, cols, smallest):
    """A random matrix whose singular values spread from 1 down to `smallest`."""
    U, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols)))
    V, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols)))
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), min(rows, cols))
    return U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 32, 48), "square"])
def test_newton_schulz_is_near_orthogonal(shape, dtype):
    torch.manual_seed(0)
    # square Gaussian matrices have near-zero singular values that 5 steps cannot lift; use a spread of 100x
    G = spectrum_matrix(64, 64, 0.01) if shape == "square" else torch.randn(shape)
    X = zeropower_via_newtonschulz5(G, steps=5, dtype=dtype)
    assert X.shape == G.shape and X.dtype == dtype
    s = torch.linalg.svdvals(X.float())
    # the quintic lands singular values in roughly (0.7, 1.2), not exactly on 1
    assert s.min() > 0.5 and s.max() < 1.5
    # and the update points the same way as the exact orthogonal factor U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(X.float().flatten(), (U @ Vh).flatten(), dim=0)
    assert cos > 0.95


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def test_muon_step_scales_by_aspect_ratio():
    tall = torch.nn.Parameter(torch.zeros(256, 64))
    wide = torch.nn.Parameter(torch.zeros(64, 256))
    opt = Muon([tall, wide], lr=0.1, momentum=0.0, nesterov=False)
    torch.manual_seed(0)
    tall.grad, wide.grad = torch.randn(256, 64), torch.randn(64, 256)
    opt.step()
    # orthogonalised updates have RMS ~ 1/sqrt(max dim); the tall one is scaled up by sqrt(4)
    ratio = tall.detach().pow(2).mean().sqrt() / wide.detach().pow(2).mean().sqrt()
    assert 1.7 < ratio < 2.3


def test_muon_two_steps_follow_nesterov_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 48))
    start = w.detach().clone()
    opt = Muon([w], lr=0.05, momentum=0.9, ns_dtype=torch.float32)
    g1, g2 = torch.randn(32, 48), torch.randn(32, 48)
    w.grad = g1.clone()
    opt.step()
    w.grad = g2.clone()
    opt.step()
    buf1 = 0.1 * g1  # buf <- lerp(buf, g, 1 - momentum), from zero
    buf2 = 0.9 * buf1 + 0.1 * g2
    ns = lambda g: zeropower_via_newtonschulz5(g, dtype=torch.float32)
    expected = start - 0.05 * ns(0.1 * g1 + 0.9 * buf1) - 0.05 * ns(0.1 * g2 + 0.9 * buf2)
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf2)


@pytest.fixture
def pick(monkeypatch):
    """fast_ns_dtype with the CPU's flags (None: unreadable) and micro-benchmark times given."""
    def run(device_type, flags=None, seconds=None):
        optim.fast_ns_dtype.cache_clear()
        monkeypatch.setattr(optim, "cpu_flags", lambda: flags)
        monkeypatch.setattr(optim, "_ns_seconds", lambda dtype: seconds[dtype])
        return optim.fast_ns_dtype(device_type)
    yield run
    optim.fast_ns_dtype.cache_clear()


def test_newton_schulz_dtype_follows_the_hardware(pick):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert pick("cuda", flags={"avx2"}) == (bf16, "CUDA")
    for flags in ({"avx2", "fma"}, {"avx2", "avx512f"}):  # AVX-512 alone emulates bf16 too
        dtype, why = pick("cpu", flags=flags)
        assert dtype == fp32 and "without native bf16" in why
    assert pick("cpu", flags={"avx512f", "avx512_bf16"})[0] == bf16
    dtype, why = pick("cpu", flags={"amx_bf16"})
    assert dtype == bf16 and "amx_bf16" in why
    # no flags to read (ARM, macOS): the faster of a timed run decides
    assert pick("cpu", seconds={bf16: 0.2, fp32: 0.5})[0] == bf16
    dtype, why = pick("cpu", seconds={bf16: 0.9, fp32: 0.05})
    assert dtype == fp32 and "bf16 900 ms, fp32 50 ms" in why


def test_muon_ns_dtype_auto_configured_or_refused(pick):
    pick("cpu", flags={"avx2"})  # the cache now holds an AVX2 machine's answer
    w = [torch.nn.Parameter(torch.zeros(8, 8))]
    auto = Muon(w)
    assert (auto.ns_dtype, auto.ns_dtype_name) == (torch.float32, "float32")
    assert "without native bf16" in auto.ns_dtype_reason
    assert Muon(w, ns_dtype="bfloat16").ns_dtype == torch.bfloat16
    assert Muon(w, ns_dtype=torch.float32).ns_dtype_reason == "configured"
    with pytest.raises(ValueError, match="ns_dtype must be 'auto', 'bfloat16', 'float32'"):
        Muon(w, ns_dtype="fp8")
    _, muon = setup_optimizers(make_model(), ns_dtype="bfloat16")
    assert muon.ns_dtype == torch.bfloat16 and muon.ns_dtype_reason == "configured"


def test_distributed_optimizers_need_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        setup_optimizers(make_model(), distributed=True)


def test_setup_optimizers_groups_every_parameter_once():
    model = make_model()
    adamw, muon = setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and not isinstance(adamw, DistAdamW)
    assert isinstance(muon, Muon) and not isinstance(muon, DistMuon)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert set(seen) == {id(p) for p in model.parameters()}
    for opt in (adamw, muon):
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]
    scale = (64 / 768) ** -0.5
    lm_head_group, wte_group = adamw.param_groups
    assert lm_head_group["params"] == [model.lm_head.weight]
    assert lm_head_group["lr"] == pytest.approx(0.004 * scale)
    assert wte_group["lr"] == pytest.approx(0.2 * scale)
    assert all(g["lr"] == 0.02 and p.ndim == 2 for g in muon.param_groups for p in g["params"])


def test_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    model = make_model()
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 96, (4, 16))
    y = torch.roll(x, -1, dims=1)
    first = model(x, y).item()
    for _ in range(30):
        train_step(model, optimizers, x, y)
    last = model(x, y).item()
    assert last < 0.5 * first, (first, last)


def test_state_dicts_round_trip_exactly():
    torch.manual_seed(0)
    x = torch.randint(0, 96, (4, 16))
    y = torch.randint(0, 96, (4, 16))
    model = make_model()
    optimizers = model.setup_optimizers()
    for _ in range(3):
        train_step(model, optimizers, x, y)
    for opt in optimizers:  # a schedule's multiplier must survive too
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * 0.5

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = make_model(seed=99)
    restored.load_state_dict(saved["model"])
    restored_opts = restored.setup_optimizers()
    for opt, sd in zip(restored_opts, saved["optim"]):
        opt.load_state_dict(sd)

    train_step(model, optimizers, x, y)
    train_step(restored, restored_opts, x, y)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS = 3
GLOBAL_BATCH = 4


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 96, (GLOBAL_BATCH, 16), generator=g),
             torch.randint(0, 96, (GLOBAL_BATCH, 16), generator=g)) for _ in range(STEPS)]


def _ddp_worker(rank, world_size, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    distcheck.install_if_requested()
    try:
        model = make_model()
        optimizers = model.setup_optimizers()
        assert isinstance(optimizers[0], DistAdamW) and isinstance(optimizers[1], DistMuon)
        optimizers[1].ns_dtype = torch.float32  # see Muon's docstring: comparable up to fp32 rounding
        per_rank = GLOBAL_BATCH // world_size
        for x, y in _batches():
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            train_step(model, optimizers, x[rows], y[rows])
        torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]},
                   f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_rank_gloo_matches_one_process(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    rank0 = torch.load(f"{out}.0", weights_only=True)
    rank1 = torch.load(f"{out}.1", weights_only=True)

    torch.manual_seed(0)
    model = make_model()
    optimizers = model.setup_optimizers()
    optimizers[1].ns_dtype = torch.float32
    for x, y in _batches():
        train_step(model, optimizers, x, y)

    start = make_model().state_dict()
    for name, p in model.state_dict().items():
        # ranks hold bit-identical weights; they match the single process up to rounding
        # (AdamW's tiny eps can amplify it where a gradient is near zero: allow a rare element)
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name
        close = (rank0["model"][name] - p).abs() <= 1e-5
        assert close.float().mean() >= 0.999, name
        assert not torch.equal(p, start[name]), name  # every parameter moved
    # optimizer state is replicated: rank 0's state_dict is the whole checkpoint
    for sd0, sd1 in zip(rank0["optim"], rank1["optim"]):
        assert sd0["state"].keys() == sd1["state"].keys()
        for i in sd0["state"]:
            for key, value in sd0["state"][i].items():
                assert torch.equal(value, sd1["state"][i][key]), (i, key)


# 3 tall matrices (rows > cols: like c_fc) for 2 ranks: slices of 2, one padded with a zero matrix
TALL, WIDE = (3, 48, 16), (2, 16, 48)


def _muon_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape[1:], generator=g)) for shape in (TALL, WIDE) for _ in range(shape[0])]


def _muon_grads(gen):
    return [torch.randn(shape[1:], generator=gen) for shape in (TALL, WIDE) for _ in range(shape[0])]


def _strict_worker(rank, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    distcheck.install()  # the suite's environment did already; this test must not depend on it
    try:
        with pytest.raises(distcheck.CollectiveError, match=r"dist.all_reduce: tensor on rank 0 .* not contiguous"):
            dist.all_reduce(torch.ones(6, 4).mT if rank == 0 else torch.ones(4, 6))
        with pytest.raises(distcheck.CollectiveError, match=r"rank 0: tensor float32\[2\]; rank 1: tensor float32\[3"):
            dist.all_reduce(torch.ones(2 + rank))
        with pytest.raises(distcheck.CollectiveError, match="different tensors"):
            dist.broadcast(torch.ones(3, dtype=torch.float32 if rank else torch.bfloat16), src=0)
        out = torch.empty(4, 3)
        with pytest.raises(distcheck.CollectiveError, match=r"input_tensor on rank 1 .* not contiguous"):
            dist.all_gather_single(out, torch.ones(3, 2).mT if rank == 1 else torch.ones(2, 3))
        # the ranks stay in step after the errors: nothing reached gloo
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        dist.all_gather_single(out, torch.full((2, 3), float(rank)))
        assert t.item() == 3 and out.tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2

        # DistMuon: the Newton-Schulz result of a tall matrix is a transposed view, which NCCL refuses to gather
        params = _muon_params()
        opt = DistMuon(params, lr=0.05, ns_dtype=torch.float32)
        gen = torch.Generator().manual_seed(10 + rank)  # each rank its own gradients
        for _ in range(2):
            for p, g in zip(params, _muon_grads(gen)):
                p.grad = g
            opt.step()
        torch.save([p.detach() for p in params], f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_strict_collectives_raise_where_nccl_would_and_dist_muon_passes(tmp_path):
    out = str(tmp_path / "muon")
    mp.spawn(_strict_worker, args=(_free_port(), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    params = _muon_params()
    opt = Muon(params, lr=0.05, ns_dtype="float32")
    gens = [torch.Generator().manual_seed(10 + r) for r in range(2)]
    for _ in range(2):
        for p, *g in zip(params, *map(_muon_grads, gens)):
            p.grad = sum(g) / 2  # what the ranks' all-reduce averages
        opt.step()
    for a, b, p in zip(rank0, rank1, params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), atol=1e-5, rtol=1e-5)
