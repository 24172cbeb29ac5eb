"""What every training stage shares: process group and device, LR schedule, checkpoints, progress,
and the training loop itself (`train_loop`), into which base, mid, SFT and RL training plug their step.

Checkpoints live in the stage's store `_work/` dir as `ckpt_{step:06d}/`:
model.safetensors (rank 0), optim_rank{r}.pt (each rank its own optimizer state), state.json
(step, loader positions of all ranks, RNG states, loss history) and COMPLETE, written
last by rank 0 (atomically) with the sha256 of every file. A checkpoint without COMPLETE, or
whose files do not match it, is never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from nanopipe import distcheck, gpus, loading, sizing
from nanopipe.device import autocast_for, setup_device
from nanopipe.faults import fault_point
from nanopipe.progress import StageProgress, fmt_eta, numbers
from nanopipe.tracking import start_tracking
from nanopipe.store import IntegrityError, Store, writing

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

COMPLETE = "COMPLETE"


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def autocast(self):
        return autocast_for(self.device)

    def close(self) -> None:
        """Leave the process group cleanly (exiting with it open can abort the process)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_distributed(device_pref: str = "auto", threads: int | None = None, seed: int | None = None) -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU); the device is
    nanopipe.device's choice: CUDA when present, else CPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = setup_device(device_pref, local_rank)  # on CUDA: GPU local_rank, TF32 matmuls
    use_cuda = device.type == "cuda"
    if not use_cuda:
        # Share the cores among ranks, never more threads than cores: an oversubscribed OpenMP
        # pool spin-waits (5-20x slower steps on 2 cores). The loader's tokenizer threads need
        # little: one rank on 2 cores takes 1.8x the tokens/s with 2 threads as with 1.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        distcheck.install_if_requested()
    if seed is not None:
        torch.manual_seed(seed)
    return Dist(rank, local_rank, world, device)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device (nanopipe.gpus), for MFU; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    gpu = gpus.gpu_of(torch.cuda.get_device_name(device))
    return gpu.bf16_flops if gpu else None


def pick_device_batch(d: Dist, stage: str, value: int | str, candidates: list[int], need: Callable[[int], int],
                      log=print) -> int:
    """A configured device batch as it is; "auto": sizing.auto_device_batch against this device: the
    CUDA device's memory less sizing.memory_budget's headroom, on CPU sizing.cpu_memory_budget.
    Every rank takes the smallest pick of all ranks."""
    if value != "auto":
        return int(value)
    cuda = d.device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(d.device).total_memory
        budget, where = sizing.memory_budget(total), f"{torch.cuda.get_device_name(d.device)} ({total / sizing.GiB:.0f} GiB)"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget, where = sizing.cpu_memory_budget(total), f"this CPU ({total / sizing.GiB:.0f} GiB)"
    pick = sizing.auto_device_batch(stage, candidates, need, budget, where, cpu=not cuda)
    if d.world_size > 1:
        agreed = torch.tensor([pick], dtype=torch.long, device=d.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        pick = int(agreed.item())
    log(f"[{stage}] device_batch_size=auto: {pick} rows (estimated peak {need(pick) / sizing.GiB:.2f} GiB of "
        f"{budget / sizing.GiB:.1f} GiB usable on {where})")
    return pick


def lr_multiplier(step: int, total: int, warmup_ratio: float, warmdown_ratio: float, final_frac: float) -> float:
    """Linear warmup, constant, linear warmdown to final_frac (nanochat's schedule)."""
    warmup = round(warmup_ratio * total)
    warmdown = round(warmdown_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total - warmdown:
        return 1.0
    progress = (total - step) / warmdown
    return progress + (1 - progress) * final_frac


def muon_momentum(step: int) -> float:
    """Muon momentum warms from 0.85 to 0.95 over the first 300 steps (nanochat)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedule(optimizers, lrm: float, step: int) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if "momentum" in group and "betas" not in group:
                group["momentum"] = muon_momentum(step)


# ----- RNG state -----

def rng_state() -> dict:
    _, keys, pos, _, _ = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- checkpoints -----

def _tensor_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_tensor_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Checkpoints:
    """Numbered checkpoints under a store dir; writes through fsspec, so S3 works too."""

    def __init__(self, store: Store, work_dir: str, keep: int = 2):
        self.store, self.dir, self.keep = store, work_dir, keep
        self.fs = store.fs

    def _ckpt(self, step: int) -> str:
        return posixpath.join(self.dir, f"ckpt_{step:06d}")

    def steps(self) -> list[int]:
        """Steps of complete checkpoints, newest first."""
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.dir, detail=False)]
        except FileNotFoundError:
            return []
        steps = [int(n[5:]) for n in names if n.startswith("ckpt_") and n[5:].isdigit()]
        return sorted((s for s in steps if self.fs.exists(posixpath.join(self._ckpt(s), COMPLETE))), reverse=True)

    def save(self, d: Dist, step: int, model: torch.nn.Module, optimizers, state: dict) -> None:
        """All ranks call this: rank 0 writes the model and the JSON state, every rank its own
        optimizer and RNG state; rank 0 writes COMPLETE last, with every file's sha256."""
        path = self._ckpt(step)
        opt_blob = _tensor_bytes([o.state_dict() for o in optimizers])
        rng_blob = _tensor_bytes(rng_state())
        if d.is_master:
            with writing(self.store.url_of(path)):
                self.fs.makedirs(path, exist_ok=True)
        d.barrier()
        own = {f"optim_rank{d.rank}.pt": opt_blob, f"rng_rank{d.rank}.pt": rng_blob}
        if d.is_master:
            own[loading.MODEL_FILE] = model_bytes(model)
            own["state.json"] = json.dumps(state, sort_keys=True).encode()
        for name, blob in own.items():
            with writing(self.store.url_of(posixpath.join(path, name))):
                self.fs.pipe_file(posixpath.join(path, name), blob)
        digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in own.items()}
        if d.world_size > 1:
            gathered: list = [None] * d.world_size
            dist.all_gather_object(gathered, digests)
            digests = {k: v for g in gathered for k, v in g.items()}
        if d.is_master:
            # COMPLETE all at once or not at all: a reader never sees a half-written list of digests.
            self.store.atomic_put(posixpath.join(path, COMPLETE), json.dumps(digests, sort_keys=True).encode())
            for old in self.steps()[self.keep:]:
                self.store.remove(self._ckpt(old))
        d.barrier()

    def _read(self, step: int, name: str) -> bytes:
        path = self._ckpt(step)
        try:
            digests = json.loads(self.fs.cat_file(posixpath.join(path, COMPLETE)))
        except ValueError as e:
            raise IntegrityError(f"{self.store.url_of(posixpath.join(path, COMPLETE))}: not valid JSON ({e}); "
                                 "the checkpoint is damaged and will not be loaded") from None
        if name not in digests:
            raise IntegrityError(f"{self.store.url_of(path)}: checkpoint has no {name} (saved with another world size?)")
        data = self.fs.cat_file(posixpath.join(path, name))
        if hashlib.sha256(data).hexdigest() != digests[name]:
            raise IntegrityError(f"{self.store.url_of(posixpath.join(path, name))}: sha256 mismatch; "
                                 "the checkpoint file is corrupt and will not be loaded")
        return data

    def load(self, d: Dist, step: int, model: torch.nn.Module, optimizers) -> dict:
        model.load_state_dict(safetensors.torch.load(self._read(step, loading.MODEL_FILE)))
        for opt, sd in zip(optimizers, _load_tensor_bytes(self._read(step, f"optim_rank{d.rank}.pt"))):
            opt.load_state_dict(sd)
        set_rng_state(_load_tensor_bytes(self._read(step, f"rng_rank{d.rank}.pt")))
        return json.loads(self._read(step, "state.json"))


# ----- step timing -----

class StepTimer:
    """Step timing, tokens/s, MFU and ETA; the first steps (warm-up, compile) are left out of rates.
    (What is reported to watchers is nanopipe.progress.StageProgress, fed from these figures.)"""

    def __init__(self, total_steps: int, flops_per_token: float, peak: float | None, skip: int = 2):
        self.total, self.flops, self.peak, self.skip = total_steps, flops_per_token, peak, skip
        self.timed_steps, self.timed_s, self.timed_tokens = 0, 0.0, 0
        self.t = time.time()

    def tick(self, step: int, tokens: int) -> dict:
        now = time.time()
        dt, self.t = now - self.t, now
        if step >= self.skip or not self.timed_steps:
            self.timed_steps, self.timed_s, self.timed_tokens = self.timed_steps + 1, self.timed_s + dt, self.timed_tokens + tokens
        tps = self.timed_tokens / self.timed_s if self.timed_s else 0.0
        out = {"dt": dt, "tokens_per_s": tps, "flops_per_s": tps * self.flops,
               "eta_s": self.timed_s / self.timed_steps * max(self.total - step - 1, 0)}
        if self.peak:
            out["mfu"] = tps * self.flops / self.peak
        return out


# ----- the loop every training stage runs -----

@dataclass
class LoopSpec:
    name: str  # stage name, for logs and fault points
    steps: int
    flops_per_token: float
    grad_clip: float
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    eval_every: int  # 0: no periodic evaluation
    checkpoint_every: int
    keep_checkpoints: int
    val_metric: str | None = None  # metric name of a numeric evaluate() value (loop_metrics reports the last)
    eval_at_ends: bool = False  # also evaluate before the first step and after the last when eval_every is 0
    log_every: int = 10  # a progress line every this many steps (and the first three and the last)
    show: tuple[str, ...] = ()  # values of StepOut.extra shown on the progress line


@dataclass
class StepOut:
    """What the forward and backward passes of one optimizer step report, over every micro-batch
    and rank. loss and tokens may be tensors: the loop reads them after the optimizer step."""
    loss: float | torch.Tensor  # the step's training loss: the curve and the progress line
    tokens: int | torch.Tensor  # tokens fed forward by all ranks: tokens/s and MFU
    extra: dict = field(default_factory=dict)  # more per-step values for the curve (RL: reward, solved, ...)


StepFn = Callable[[int], StepOut]


def supervised_step(d: Dist, fwd, batches, grad_accum: int) -> StepFn:
    """The step of base, mid and SFT training: grad_accum micro-batches of next-token loss from
    `batches`, each the mean over its target tokens (targets -1 are ignored) and weighted 1/grad_accum,
    as nanochat does. A micro-batch without any target (a chat batch whose assistant turns were all
    cropped) adds nothing: its loss is 0, not the NaN of a mean over zero tokens, which would ruin the
    weights. The step's loss is the mean over the micro-batches with targets, on all ranks."""
    def step(_: int) -> StepOut:
        loss_and_count = torch.zeros(2, device=d.device)  # sum of micro-batch losses, micro-batches with targets
        tokens = torch.zeros((), dtype=torch.long, device=d.device)
        for _ in range(grad_accum):
            x, y = next(batches)
            targets = (y >= 0).sum()
            with d.autocast():
                loss = fwd(x, y, loss_reduction="sum") / targets.clamp(min=1)
            (loss / grad_accum).backward()
            loss_and_count += torch.stack([loss.detach().float(), (targets > 0).float()])
            tokens += x.numel()
        if d.world_size > 1:
            dist.all_reduce(loss_and_count)
            dist.all_reduce(tokens)
        return StepOut(loss_and_count[0] / loss_and_count[1].clamp(min=1), tokens)
    return step


def train_loop(ctx: "StageContext", d: Dist, spec: LoopSpec, model, optimizers, step_fn: StepFn,
               evaluate: Callable[[int], tuple], log, data=None) -> dict:
    """Train `spec.steps` optimizer steps with checkpoints and exact resume; returns the run state.

    step_fn(step) -> StepOut: forward and backward of one step; the loop then clips the gradients,
        sets the LR schedule, steps the optimizers and zeroes the gradients.
    evaluate(step) -> (value, text): a held-out evaluation (a JSON-able value and its log text), run in
        eval mode without gradients every eval_every steps and after the last (eval_at_ends: and
        before the first, whatever eval_every is).
    data: the iterator step_fn draws batches from; its state_dict() (one per rank) is saved in
        checkpoints and load_state_dict() restores it on resume. None when a step's data is a
        function of the step alone (RL).
    The state: step, loader (positions of all ranks), curve [{step, loss, lrm, **extra}],
    val [[step, value]], tokens, train_s (seconds in steps, evaluations and checkpoints left out).
    While it runs, rank 0 reports progress (nanopipe.progress: the stage's progress file and its
    parent) and, when tracking.wandb_project is set, each step and evaluation to W&B (nanopipe.tracking).
    """
    ckpts = Checkpoints(ctx.store, ctx.writer.work, spec.keep_checkpoints)
    state = {"step": 0, "loader": None, "curve": [], "val": [], "tokens": 0, "train_s": 0.0}
    done = ckpts.steps()
    resumed_at = None
    if done:
        state = ckpts.load(d, done[0], model, optimizers)
        resumed_at = state["step"]
        if data is not None:
            data.load_state_dict(state["loader"][d.rank])
        log(f"[{spec.name}] resumed from checkpoint at step {resumed_at}")
    timer = StepTimer(spec.steps, spec.flops_per_token, peak_flops(d.device))
    watch = StageProgress(ctx, spec.steps)
    tracker = start_tracking(ctx.tracking, ctx.stage, ctx.key, ctx.config.model_dump(mode="json")) if d.is_master else None
    watch.update(state["step"], force=True)
    evaluates = spec.eval_every > 0 or spec.eval_at_ends
    smooth = None
    step = state["step"]
    model.train()
    while True:
        last = step == spec.steps
        due = last or (spec.eval_at_ends and step == 0) or (spec.eval_every and step % spec.eval_every == 0)
        if evaluates and due and not (state["val"] and state["val"][-1][0] == step):
            model.eval()
            with torch.no_grad(), d.autocast():
                value, text = evaluate(step)
            model.train()
            state["val"].append([step, value])
            log(f"[{spec.name}] step {step}/{spec.steps} | {text}")
            watch.update(step, numbers(spec.val_metric or "val", value), force=True)
            if tracker:
                tracker.log(numbers(spec.val_metric or "val", value), step)
            timer.t = time.time()  # step timings and the ETA leave evaluations out
        if 0 < step < spec.steps and step % spec.checkpoint_every == 0 and step != resumed_at:
            state.update(step=step, loader=None if data is None else _gather(d, data.state_dict()))
            ckpts.save(d, step, model, optimizers, state)
            log(f"[{spec.name}] checkpoint at step {step}")
            timer.t = time.time()
        if last:
            watch.update(step, eta_s=0.0, force=True)
            break
        t0 = time.time()
        out = step_fn(step)
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        lrm = lr_multiplier(step, spec.steps, spec.warmup_ratio, spec.warmdown_ratio, spec.final_lr_frac)
        set_schedule(optimizers, lrm, step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss, n_tokens = float(out.loss), int(out.tokens)  # syncs with the device, so the timing is real
        state["train_s"] += time.time() - t0
        state["tokens"] += n_tokens
        state["curve"].append({"step": step, "loss": loss, "lrm": lrm, **out.extra})
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        p = timer.tick(step, n_tokens)
        rates = {"tokens_per_s": p["tokens_per_s"], **({"mfu": p["mfu"]} if "mfu" in p else {})}
        if tracker:
            tracker.log({"loss": loss, "lrm": lrm, **rates, **out.extra}, step)
        step += 1
        fault_point(f"{spec.name}.step")
        logged = step % spec.log_every == 0 or step == spec.steps or step <= 3
        watch.update(step, {"loss": smooth, "lrm": lrm, **rates, **{k: out.extra[k] for k in spec.show}},
                     eta_s=p["eta_s"], force=logged)
        if logged:
            shown = "".join(f" | {k} {out.extra[k]:.3f}" for k in spec.show)
            mfu = f" | MFU {100 * p['mfu']:.1f}%" if "mfu" in p else ""
            log(f"[{spec.name}] step {step}/{spec.steps} | loss {smooth:.4f}{shown} | lr x{lrm:.3f} | "
                f"{_fmt_dt(p['dt'])} | {p['tokens_per_s']:,.0f} tok/s | {p['flops_per_s'] / 1e12:.3f} TFLOP/s{mfu} | "
                f"ETA {fmt_eta(p['eta_s'])}")
    if tracker:
        tracker.finish()
    return state


def _fmt_dt(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f}s"


def loop_metrics(spec: LoopSpec, state: dict, d: Dist) -> dict:
    m = {"steps": spec.steps, "tokens": state["tokens"], "final_loss": state["curve"][-1]["loss"] if state["curve"] else None,
         "train_seconds": round(state["train_s"], 2),
         "tokens_per_s": round(state["tokens"] / state["train_s"], 1) if state["train_s"] else None,
         "world_size": d.world_size, "device": d.device.type}
    if spec.val_metric:
        m[spec.val_metric] = state["val"][-1][1] if state["val"] else None
    peak = peak_flops(d.device)
    if peak and state["train_s"]:
        m["mfu"] = round(state["tokens"] * spec.flops_per_token / state["train_s"] / peak, 4)
    return m


def loss_curve(state: dict) -> list[list]:
    """The training loss as [[step, loss], ...] (loss_curve.json's "train" series)."""
    return [[e["step"], e["loss"]] for e in state["curve"]]


# ----- what training stages share besides the loop -----

def warm_start(ctx: "StageContext", d: Dist):
    """(parent stage, tokenizer, model, optimizers) for a stage that continues training the model of
    its model-holding upstream stage (mid_train: base_train, sft: mid_train, rl: sft; see STAGES).
    The optimizers' learning rates are the configured ones times init_lr_frac."""
    cfg = ctx.config
    parent = next(u for u in ctx.upstream if u in loading.MODEL_STAGES)
    tok = loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])
    model = loading.load_model(ctx.store, ctx.upstream[parent], d.device).train()
    optimizers = model.setup_optimizers(cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.weight_decay,
                                        ns_dtype=cfg.muon_ns_dtype)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * cfg.init_lr_frac
    return parent, tok, model, optimizers


def save_model(writer, model: torch.nn.Module, **config_extra) -> None:
    """model.safetensors and model_config.json: what loading.load_model reads back."""
    writer.write_bytes(loading.MODEL_FILE, model_bytes(model))
    writer.write_json("model_config.json", {**model.config.__dict__, **config_extra})


def _gather(d: Dist, own: dict) -> list[dict]:
    if d.world_size == 1:
        return [own]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, own)
    return out


def model_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights as safetensors (contiguous CPU tensors: safetensors stores no strides)."""
    return safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
                                  metadata={"format": "pt"})
