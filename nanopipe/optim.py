"""
Optimizers: Muon for the Transformer's 2-D matrices, AdamW for the embedding
and lm_head (nanochat's split), and their distributed variants.

Muon (https://kellerjordan.github.io/posts/muon/) runs SGD with Nesterov
momentum and replaces each matrix's update by an approximately orthogonal one,
computed with a quintic Newton-Schulz iteration (modded-nanogpt's coefficients).
bf16 is stable there, and 2-3x faster than fp32 on GPUs and on CPUs with native
bf16 (AVX512-BF16, AMX); on a CPU without (AVX2 only) it is emulated and 10-20x
slower than fp32, so the dtype is picked per device (fast_ns_dtype).
Matrices of one shape are stacked, so each group needs a handful of batched
matmuls rather than a loop of small ones.

Distributed training (torchrun; gloo on CPU, nccl on GPU): the model is NOT
wrapped in DDP. Every rank runs forward/backward on its own micro-batches, then
the optimizers average the gradients themselves in step():
- DistAdamW all-reduces its gradients, then every rank runs the same AdamW update.
- DistMuon all-reduces the stacked gradients and updates the momentum on every
  rank (cheap, elementwise), but each rank orthogonalises only its slice of each
  shape group; the slices are all-gathered.
So every rank holds the full, identical optimizer state: rank 0's state_dict is
the whole checkpoint, and a run can resume under any world size. The price over
nanochat's sharded state is one all-reduce instead of a reduce-scatter per step.
"""

import functools
import platform
import time

import torch
import torch.distributed as dist

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CPU_NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # x86 feature flags of bf16 matmul hardware


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G (..., m, n): U S V^T -> U S' V^T,
    with S' roughly in (0.7, 1.2) rather than exactly 1 (the quintic's coefficients
    trade exactness for speed; training does not mind). Computes and returns `dtype`."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs matrices, got a tensor of shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # batched: baddbmm fuses the scaling into the matmuls
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    return (X.mT if transposed else X).reshape(G.shape)


def cpu_flags() -> set[str] | None:
    """The x86 CPU's feature flags (Linux /proc/cpuinfo); None elsewhere or when unreadable."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def _ns_seconds(dtype: torch.dtype, shape=(4, 128, 512), reps: int = 2) -> float:
    G = torch.randn(shape)
    zeropower_via_newtonschulz5(G, dtype=dtype)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        zeropower_via_newtonschulz5(G, dtype=dtype)
    return (time.perf_counter() - t0) / reps


@functools.cache
def fast_ns_dtype(device_type: str) -> tuple[torch.dtype, str]:
    """(dtype, why) for Newton-Schulz on a device type: bf16 where the hardware has it (CUDA, x86
    CPUs with AVX512-BF16 or AMX), fp32 on other x86 CPUs; elsewhere (ARM, macOS) a one-time
    micro-benchmark decides. Cached per process."""
    if device_type == "cuda":
        return torch.bfloat16, "CUDA"
    if device_type != "cpu":
        return torch.float32, f"{device_type}: bf16 matmul speed unknown"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if flags is not None:
        native = [f for f in CPU_NATIVE_BF16 if f in flags]
        if native:
            return torch.bfloat16, f"CPU with {', '.join(native)} ({capability})"
        return torch.float32, f"CPU without native bf16 ({capability}; no {'/'.join(CPU_NATIVE_BF16)})"
    t16, t32 = _ns_seconds(torch.bfloat16), _ns_seconds(torch.float32)
    dtype = torch.bfloat16 if t16 < t32 else torch.float32
    return dtype, f"CPU ({capability}) measured: bf16 {t16 * 1e3:.0f} ms, fp32 {t32 * 1e3:.0f} ms"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices only (not
    embeddings, lm_head, or 0/1-D parameters). Parameters are grouped by shape;
    each group's learning rate is scaled by sqrt(max(1, rows/cols)).
    ns_dtype: "auto" (fast_ns_dtype of the parameters' device: bf16, nanochat's
    choice, where the hardware has it), "bfloat16", "float32" or a torch dtype.
    float32 makes runs comparable up to fp32 rounding, since bf16 rounding noise
    is amplified in the directions where a gradient is (near) rank-deficient."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype | str = "auto"):
        params = list(params)
        if not params:
            raise ValueError("Muon got an empty parameter list")
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon handles 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: bad lr={lr}, momentum={momentum} or ns_steps={ns_steps}")
        # Sorted shapes: every rank builds the same groups in the same order.
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        if ns_dtype == "auto":
            self.ns_dtype, self.ns_dtype_reason = fast_ns_dtype(params[0].device.type)
        elif isinstance(ns_dtype, torch.dtype) or ns_dtype in NS_DTYPES:
            self.ns_dtype, self.ns_dtype_reason = NS_DTYPES.get(ns_dtype, ns_dtype), "configured"
        else:
            raise ValueError(f"Muon: ns_dtype must be 'auto', {', '.join(map(repr, NS_DTYPES))} or a torch dtype, "
                             f"got {ns_dtype!r}")

    @property
    def ns_dtype_name(self) -> str:
        return dtype_name(self.ns_dtype)

    def describe(self) -> str:
        """One log line: the Newton-Schulz dtype and why."""
        return f"Muon Newton-Schulz in {self.ns_dtype_name}: {self.ns_dtype_reason}"

    def _orthogonalize(self, update: torch.Tensor, steps: int) -> torch.Tensor:
        return zeropower_via_newtonschulz5(update, steps, self.ns_dtype)

    def _stacked_grads(self, group) -> torch.Tensor:
        for p in group["params"]:
            if p.grad is None:
                raise RuntimeError(f"Muon: a parameter of shape {tuple(p.shape)} has no gradient; "
                                   "every matrix must take part in the loss")
        return torch.stack([p.grad for p in group["params"]])

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            self._step_group(group, self._stacked_grads(group))

    def _step_group(self, group, grads: torch.Tensor):
        params = group["params"]
        momentum = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        g = list(grads.unbind(0))  # views: the updates below write into `grads`
        torch._foreach_lerp_(bufs, g, 1 - momentum)
        if group["nesterov"]:
            torch._foreach_lerp_(g, bufs, momentum)
        else:
            grads.copy_(torch.stack(bufs))
        update = self._orthogonalize(grads, group["ns_steps"]).to(params[0].dtype)
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-group["lr"] * scale)


class DistMuon(Muon):
    """Muon under torch.distributed: averages gradients across ranks, then each
    rank orthogonalises its slice of every shape group and all-gathers the rest.
    Needs an initialised process group; the model must not be wrapped in DDP."""

    def __init__(self, params, **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs torch.distributed to be initialised (torchrun)")
        super().__init__(params, **kwargs)
        # Every rank computes in rank 0's dtype: the gathered slices must match, and the
        # replicated state stays identical (a micro-benchmark may decide differently per rank).
        choice = [(self.ns_dtype, self.ns_dtype_reason)]
        dist.broadcast_object_list(choice, src=0)
        self.ns_dtype, self.ns_dtype_reason = choice[0]

    def _orthogonalize(self, update, steps):
        world, rank = dist.get_world_size(), dist.get_rank()
        n = update.size(0)
        per_rank = -(-n // world)
        if per_rank * world != n:  # pad with zero matrices so every rank gets an equal slice
            pad = update.new_zeros((per_rank * world - n, *update.shape[1:]))
            update = torch.cat([update, pad])
        mine = zeropower_via_newtonschulz5(update[rank * per_rank:(rank + 1) * per_rank], steps, self.ns_dtype)
        mine = mine.contiguous()  # a tall matrix's result is a transposed view; NCCL gathers contiguous tensors only
        out = mine.new_empty((per_rank * world, *mine.shape[1:]))
        dist.all_gather_single(out, mine)
        return out[:n]

    @torch.no_grad()
    def step(self):
        # Start every group's all-reduce before waiting on any of them.
        stacked = [self._stacked_grads(group) for group in self.param_groups]
        works = [dist.all_reduce(g, async_op=True) for g in stacked]
        world = dist.get_world_size()
        for group, grads, work in zip(self.param_groups, stacked, works):
            work.wait()
            self._step_group(group, grads.div_(world))


class DistAdamW(torch.optim.AdamW):
    """AdamW under torch.distributed: all-reduces (averages) the gradients, then
    every rank applies the same update, so the state is replicated on all ranks.
    Needs an initialised process group; the model must not be wrapped in DDP."""

    def __init__(self, params, **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistAdamW needs torch.distributed to be initialised (torchrun)")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DistAdamW does not support a closure")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        works = [dist.all_reduce(g, async_op=True) for g in grads]
        for work in works:
            work.wait()
        torch._foreach_div_(grads, dist.get_world_size())
        return super().step()


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup_optimizers(model, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                     weight_decay: float = 0.0, distributed: bool | None = None,
                     ns_dtype: torch.dtype | str = "auto") -> list[torch.optim.Optimizer]:
    """[AdamW for lm_head and embedding, Muon for the blocks' matrices], with
    nanochat's learning rates. AdamW learning rates scale as 1/sqrt(n_embd/768)
    (they were tuned at width 768). Each group stores `initial_lr`, so a schedule
    sets lr = initial_lr * multiplier. distributed=None picks the distributed
    variants when a process group with more than one rank is running."""
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    grouped = {id(p) for p in matrix_params + embedding_params + lm_head_params}
    all_params = list(model.parameters())
    if len(grouped) != len(all_params) or grouped != {id(p) for p in all_params}:
        raise ValueError("setup_optimizers: model parameters are not exactly blocks + wte + lm_head")

    if distributed is None:
        distributed = _is_distributed()
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
    ]
    adam_cls = DistAdamW if distributed else torch.optim.AdamW
    # fused AdamW: one kernel for all tensors, on CPU and CUDA alike
    adamw = adam_cls(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=True)
    muon = (DistMuon if distributed else Muon)(matrix_params, lr=matrix_lr, momentum=0.95, ns_dtype=ns_dtype)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
