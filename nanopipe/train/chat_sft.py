"""Chat training: mid-training and SFT warm-start from the previous stage's model and train on
rendered conversations (nanochat's mid_train and chat_sft). `train` is the `run` of both stages:
what differs between them is configuration (mixture, packing, LRs) and the model they continue.

- mid_train packs conversations into a token stream (rows cross conversations), like
  pretraining, so the model learns the special tokens and the chat/tool-call format.
- sft pads: one conversation per row, rows never cross conversations, lengths as at inference.
Both train only on what the assistant says (the chat.render_conversation mask), resume
exactly from checkpoints, and report loss on held-out conversations.

Batches as nanochat's: a mid_train step is total_batch_size tokens (524,288), an sft step
target_examples_per_step conversations (32), over all ranks; gradient accumulation makes up what
device batch x ranks (x sequence length) do not (chat_batch).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanopipe import sizing
from nanopipe.chat import render_conversation
from nanopipe.device import compile_enabled, compute_dtype
from nanopipe.tasks import Mixture, make_task
from nanopipe.train.common import (LoopSpec, init_distributed, loop_metrics, loss_curve, pick_device_batch, save_model,
                                   supervised_step, train_loop, warm_start)

if TYPE_CHECKING:
    from nanopipe.runner import StageContext


def build_mixture(specs, seed: int) -> Mixture:
    """Config task specs [{task, args, epochs}] -> a deterministic, shuffled mixture."""
    tasks = [make_task(s.task, **s.args) for s in specs]
    return Mixture(tasks, epochs=[s.epochs for s in specs], seed=seed)


class ConversationBatches:
    """(inputs, targets) batches from rendered conversations; rank r takes conversations r, r+W, ...

    Targets are -1 where the mask is 0 (user text, tool output, padding), so the loss is on the
    assistant alone. The position (epoch, next conversation, offset into the stream) is exact,
    so a resumed run continues with the very batches an uninterrupted one would have seen.
    """

    def __init__(self, convs, tok, B: int, T: int, rank: int, world: int, device, packing: str,
                 resume_state: dict | None = None):
        if len(convs) < world:
            raise ValueError(f"{len(convs)} conversations cannot be shared among {world} ranks")
        self.convs, self.tok, self.B, self.T = convs, tok, B, T
        self.rank, self.world, self.device, self.packing = rank, world, device, packing
        self.pad = tok.bos_id
        self.load_state_dict(resume_state)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "conv": self.conv, "offset": self.offset}

    def load_state_dict(self, state: dict | None) -> None:
        """Move to `state` (None: the very beginning)."""
        s = state or {"epoch": 0, "conv": self.rank, "offset": 0}
        self.epoch, self.conv, self.offset = s["epoch"], s["conv"], s["offset"]
        self._buf: deque[tuple[list[int], list[int]]] = deque()  # rendered conversations from self.conv on
        self._next = self.conv  # next conversation index to render into the buffer

    def _render_next(self) -> None:
        if self._next >= len(self.convs):
            self._next = self.rank
        ids, mask = render_conversation(self.tok, self.convs[self._next], max_tokens=self.T + 1)
        self._buf.append((ids, mask))
        self._next += self.world

    def _advance_conv(self) -> None:
        self._buf.popleft()
        self.conv += self.world
        if self.conv >= len(self.convs):
            self.conv, self.epoch = self.rank, self.epoch + 1

    def __iter__(self):
        return self

    def __next__(self):
        return self._next_stream() if self.packing == "stream" else self._next_padded()

    def _next_stream(self):
        need = self.B * self.T + 1
        while sum(len(ids) for ids, _ in self._buf) - self.offset < need:
            self._render_next()
        ids = [t for c, _ in self._buf for t in c][self.offset:self.offset + need]
        mask = [m for _, c in self._buf for m in c][self.offset:self.offset + need]
        self.offset += self.B * self.T
        while self._buf and self.offset >= len(self._buf[0][0]):
            self.offset -= len(self._buf[0][0])
            self._advance_conv()
        x = torch.tensor(ids[:-1], dtype=torch.long).view(self.B, self.T)
        y = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])], dtype=torch.long).view(self.B, self.T)
        return x.to(self.device), y.to(self.device)

    def _next_padded(self):
        rows = []
        for _ in range(self.B):
            if not self._buf:
                self._render_next()
            rows.append(self._buf[0])
            self._advance_conv()
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((self.B, width), self.pad, dtype=torch.long)
        y = torch.full((self.B, width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[i, :n] = torch.tensor(ids[:-1])
            y[i, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        return x.to(self.device), y.to(self.device)


@torch.no_grad()
def chat_loss(model, convs, tok, B: int, T: int, rank: int, world: int, device, batches: int) -> float:
    """Mean loss per assistant token over held-out conversations (padded rows), across ranks."""
    it = ConversationBatches(convs, tok, B, T, rank, world, device, "pad")
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(batches):
        x, y = next(it)
        loss = model(x, y, loss_reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def chat_batch(d, stage: str, cfg, mcfg, T: int, compiled: bool, log) -> tuple[int, int]:
    """(device batch, gradient accumulation) of a chat stage, as nanochat computes them: mid_train's
    step is total_batch_size tokens (rows of T), sft's is target_examples_per_step conversations;
    either is split over device batch x ranks, which must divide it (an "auto" device batch does)."""
    per_rank = cfg.total_batch_size // (T * d.world_size) if stage == "mid_train" else cfg.target_examples_per_step // d.world_size
    need = lambda b: sizing.train_memory(mcfg, b, T, compute_dtype(d.device).itemsize, compiled)["total"]
    B = pick_device_batch(d, stage, cfg.device_batch_size, sizing.divisors(max(per_rank, 1)), need, log)
    if stage == "mid_train":
        return B, sizing.token_grad_accum(stage, cfg.total_batch_size, B, T, d.world_size, "max_seq_len")
    return B, sizing.row_grad_accum(stage, cfg.target_examples_per_step, B, d.world_size)


def train(ctx: "StageContext") -> dict:
    """Warm-start from the upstream stage's model and train on the configured mixture."""
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads, cfg.seed)
    log = ctx.log
    parent, tok, model, optimizers = warm_start(ctx, d)
    T = min(cfg.max_seq_len, model.config.sequence_len)
    use_compile = compile_enabled(cfg.compile, d.device)
    fwd = torch.compile(model, dynamic=True) if use_compile else model
    B, grad_accum = chat_batch(d, ctx.stage, cfg, model.config, T, use_compile, log)

    train_set = build_mixture(cfg.mixture, cfg.seed)
    val_set = build_mixture(cfg.val_mixture, cfg.seed + 1)
    rows_per_step = B * d.world_size * grad_accum
    if cfg.packing == "pad" or cfg.num_iterations > 0:
        steps = sizing.sft_steps(len(train_set), rows_per_step, cfg.num_iterations)  # one epoch of the mixture
    else:
        tokens = sum(len(render_conversation(tok, train_set[i], max_tokens=T + 1)[0]) for i in range(len(train_set)))
        steps = sizing.mid_steps(tokens, rows_per_step * T, cfg.num_iterations)
    log(f"[{ctx.stage}] from {parent} {ctx.upstream[parent]['key'][:16]} | {len(train_set):,} conversations "
        f"({cfg.packing}) | {steps} steps x {rows_per_step} rows of <= {T} tokens (device batch {B} x grad accum "
        f"{grad_accum} x {d.world_size} rank(s)) | {len(val_set):,} held out")
    log(f"[{ctx.stage}] {optimizers[1].describe()}")

    spec = LoopSpec(ctx.stage, steps, model.estimate_flops(), cfg.grad_clip, cfg.warmup_ratio, cfg.warmdown_ratio,
                    cfg.final_lr_frac, cfg.eval_every, cfg.checkpoint_every, cfg.keep_checkpoints, "val_loss")

    def evaluate(step: int) -> tuple[float, str]:
        loss = chat_loss(model, val_set, tok, B, T, d.rank, d.world_size, d.device, cfg.eval_batches)
        return loss, f"val_loss {loss:.4f}"

    batches = ConversationBatches(train_set, tok, B, T, d.rank, d.world_size, d.device, cfg.packing)
    state = train_loop(ctx, d, spec, model, optimizers, supervised_step(d, fwd, batches, grad_accum), evaluate,
                       log, data=batches)
    metrics = {**loop_metrics(spec, state, d), "conversations": len(train_set), "device_batch_size": B,
               "grad_accum": grad_accum,
               "muon_ns_dtype": optimizers[1].ns_dtype_name,
               "val_loss_start": state["val"][0][1] if state["val"] else None}
    if d.is_master:
        save_model(ctx.writer, model)
        ctx.writer.write_json("loss_curve.json", {"train": loss_curve(state), "val_loss": state["val"]})
        ctx.writer.write_json("mixture.json", {"train": train_set.provenance(), "val": val_set.provenance()})
    d.close()
    return metrics
