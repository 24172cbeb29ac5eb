"""The supervised step (train.common.supervised_step) of base, mid and SFT training: micro-batch losses
weighted as nanochat's, and a chat micro-batch with no target at all adds nothing instead of NaN."""

import torch

from nanopipe.model import GPT, GPTConfig
from nanopipe.train.common import init_distributed, supervised_step


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, 64, 16, 16))
    model.init_weights(seed=0)
    return model


def grads_after(batches, grad_accum):
    model = tiny_model()
    out = supervised_step(init_distributed("cpu", threads=1), model, iter(batches), grad_accum)(0)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_micro_batch_without_targets_adds_nothing_and_no_nan():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    y[:, :5] = -1  # a prompt: not trained on
    cropped = (x.clone(), torch.full_like(y, -1))  # every assistant turn cropped away
    alone, alone_grads = grads_after([(x, y)], 1)
    both, both_grads = grads_after([(x, y), cropped], 2)
    assert torch.isfinite(both.loss) and both.loss.item() == alone.loss.item()
    for name, grad in both_grads.items():  # weighted 1/grad_accum, as nanochat weights micro-batches
        assert torch.isfinite(grad).all() and torch.allclose(grad, alone_grads[name] / 2, atol=1e-6), name
    assert both.tokens.item() == 2 * x.numel()
