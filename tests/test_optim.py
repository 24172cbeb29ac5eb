import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
