"""`nanopipe plan`: what a run will take, before any GPU hour. Nothing runs and nothing is read.

For each torchrun stage: parameters, FLOPs per token, device batch x gradient accumulation x GPUs,
tokens per step, steps, tokens, data passes, the estimated peak memory per GPU and whether it fits,
and the time at a stated MFU; for the whole run: the data (characters, tokens, shard bytes, how long
the data stage takes), the store space (data shards, models, the checkpoints a training stage keeps)
and the time and cost at a price per GPU-hour.

The arithmetic is nanopipe.sizing's, the one the training stages run with (device_batch_size=auto is
resolved here as there, against the GPU's memory). `plan` reads a RunConfig duck-typed and this module
imports no pydantic. The GPUs' memory and peak FLOP/s are nanopipe.gpus', their prices
nanopipe.report's (the run report prices a finished run with them).
"""

from __future__ import annotations

import math
import os

from nanopipe import sizing
from nanopipe.gpus import GPUS
from nanopipe.report import PRICE_PER_GPU_HOUR

DEFAULT_GPU = "h100-80gb"
DEFAULT_MFU = 0.40  # a stated assumption; bench/gpu_check.py measures the real figure on one GPU
# The data stage's rate on parquet input (FineWeb-like) when all its work shares one core: the CPU
# rate bench/data_stage.py measures (61-92M chars per CPU-second on the 2-core test machine), the
# lower end; a node with spare cores runs the shard writers beside the loop, faster (README, "Before the
# GPU hours").
DATA_STAGE_CHARS_PER_S = 60e6
SHARD_BYTES_PER_CHAR = 0.40  # zstd parquet (nanochat: ~100 MB per 250M-char FineWeb-EDU file)
CHAT_STAGES = ("mid_train", "sft")
AUTO_STAGES = ("base_train", "base_eval", "mid_train", "sft")  # whose device_batch_size may be "auto"
AUTO_LESS = {"rl": "rl.device_batch_size or rl.engine_batch", "chat_eval": "chat_eval.batch_size"}  # the others: what sets their memory


def model_config(cfg):
    """The GPTConfig base_train will build (torch is imported here, not when the module loads)."""
    from nanopipe.model import GPTConfig

    b = cfg.base_train
    return GPTConfig.from_depth(b.depth, cfg.tokenizer.vocab_size, b.sequence_len, b.head_dim, b.n_kv_head)


def plan(cfg, gpus: int | None = None, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU,
         price_per_gpu_hour: float | None = None, mid_tokens: int | None = None,
         sft_conversations: int | None = None) -> dict:
    """The plan of a RunConfig on `gpus` GPUs of kind `gpu` (a nanopipe.gpus.GPUS key) per torchrun stage
    (default: each stage's nproc_per_node x nnodes). mid_tokens / sft_conversations: the size of
    those mixtures, for their steps when num_iterations is -1 (one epoch; unknown before they are built)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    hw = GPUS[gpu]
    price = PRICE_PER_GPU_HOUR.get(gpu) if price_per_gpu_hour is None else price_per_gpu_hour
    mcfg = model_config(cfg)
    params, fpt = sizing.num_params(mcfg), sizing.flops_per_token(mcfg)
    data = _data(cfg, mcfg)
    budget = sizing.memory_budget(int(hw.memory_gib * sizing.GiB))
    ctx = dict(cfg=cfg, mcfg=mcfg, gpus=gpus, budget=budget, gpu_name=f"a {gpu} GPU", flops=hw.bf16_flops * mfu, fpt=fpt)
    stages = {
        "base_train": _base_train(ctx, data),
        "base_eval": _base_eval(ctx),
        "mid_train": _chat(ctx, "mid_train", mid_tokens),
        "sft": _chat(ctx, "sft", sft_conversations),
        "rl": _rl(ctx),
        "chat_eval": _chat_eval(ctx),
    }
    for s in stages.values():
        s["fits"] = s["memory"]["total"] <= (budget if s["device"] == "cuda" else math.inf)
        s["gpu_hours"] = s["world"] * s["seconds"] / 3600 if s["seconds"] is not None and s["device"] == "cuda" else None
    data_gpus = max(s["world"] for s in stages.values() if s["device"] == "cuda") if any(
        s["device"] == "cuda" for s in stages.values()) else 0
    timed = [s for s in stages.values() if s["seconds"] is not None]
    seconds = sum(s["seconds"] for s in timed) + data["seconds"]
    gpu_hours = sum(s["gpu_hours"] or 0 for s in timed) + data_gpus * data["seconds"] / 3600
    return {
        "preset": cfg.preset, "gpu": gpu, "gpu_memory_gib": hw.memory_gib, "gpu_bf16_flops": hw.bf16_flops,
        "memory_budget_bytes": budget, "mfu": mfu, "price_per_gpu_hour": price,
        "model": {"depth": cfg.base_train.depth, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head, "vocab_size": mcfg.vocab_size,
                  "sequence_len": mcfg.sequence_len, "params": params, "flops_per_token": fpt},
        "data": data, "stages": stages, "store": _store(cfg, mcfg, stages, data),
        "total": {"seconds": seconds, "gpu_hours": gpu_hours, "cost_usd": None if price is None else gpu_hours * price,
                  "not_timed": [n for n, s in stages.items() if s["seconds"] is None]},
    }


def _world(ctx, stage: str) -> int:
    section = getattr(ctx["cfg"], stage)
    return ctx["gpus"] if ctx["gpus"] is not None else section.nproc_per_node * section.nnodes


def _device(ctx, stage: str) -> str:
    return "cpu" if getattr(ctx["cfg"], stage).device == "cpu" else "cuda"


def _fit(ctx, stage: str, value, candidates: list[int], need) -> tuple[int, bool]:
    """(device batch, whether auto picked it), as train.common.pick_device_batch picks at run time:
    against the GPU's usable memory, or for a CPU stage a quarter of this machine's memory."""
    if value != "auto":
        return value, False
    if _device(ctx, stage) == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return sizing.auto_device_batch(stage, candidates, need, sizing.cpu_memory_budget(ram), "this CPU", cpu=True), True
    return sizing.auto_device_batch(stage, candidates, need, ctx["budget"], ctx["gpu_name"]), True


def _row(ctx, stage: str, B: int, auto: bool, memory: dict, **fields) -> dict:
    return {"device": _device(ctx, stage), "world": _world(ctx, stage), "device_batch_size": B, "auto": auto,
            "memory": memory, **fields}


def _seconds(ctx, stage: str, tokens: float | None, flops_per_token: float) -> float | None:
    if tokens is None or _device(ctx, stage) == "cpu":
        return None
    return tokens * flops_per_token / (_world(ctx, stage) * ctx["flops"])


def _bytes(ctx, stage: str) -> int:
    from nanopipe.device import compute_dtype  # torch: loaded by model_config already, not at import
    return compute_dtype(_device(ctx, stage)).itemsize


def _compiled(ctx, stage: str) -> bool:
    from nanopipe.device import compile_enabled
    return compile_enabled(getattr(ctx["cfg"], stage).compile, _device(ctx, stage))


def _base_train(ctx, data: dict) -> dict:
    b, mcfg, world = ctx["cfg"].base_train, ctx["mcfg"], _world(ctx, "base_train")
    T = b.sequence_len
    need = lambda B: sizing.train_memory(mcfg, B, T, _bytes(ctx, "base_train"), _compiled(ctx, "base_train"))["total"]
    B, auto = _fit(ctx, "base_train", b.device_batch_size, sizing.divisors(max(b.total_batch_size // (T * world), 1)), need)
    accum = sizing.token_grad_accum("base_train", b.total_batch_size, B, T, world, "sequence_len")
    steps = sizing.base_steps(b.num_iterations, b.target_flops, b.target_param_data_ratio, sizing.num_params(mcfg),
                              ctx["fpt"], b.total_batch_size)
    tokens = steps * b.total_batch_size
    available = data["train_tokens"]
    return _row(ctx, "base_train", B, auto,
                sizing.train_memory(mcfg, B, T, _bytes(ctx, "base_train"), _compiled(ctx, "base_train")),
                grad_accum=accum, tokens_per_step=b.total_batch_size, steps=steps, tokens=tokens,
                data_passes=None if available is None else tokens / available,
                seconds=_seconds(ctx, "base_train", tokens, ctx["fpt"]),
                checkpoint_bytes=_checkpoint_bytes(mcfg, world), keep_checkpoints=b.keep_checkpoints)


def _base_eval(ctx) -> dict:
    e, mcfg, world = ctx["cfg"].base_eval, ctx["mcfg"], _world(ctx, "base_eval")
    T = mcfg.sequence_len
    need = lambda B: sizing.eval_memory(mcfg, B, T, _bytes(ctx, "base_eval"))["total"]
    B, auto = _fit(ctx, "base_eval", e.device_batch_size, sizing.EVAL_DEVICE_BATCHES, need)
    tokens = max(1, e.eval_tokens // (B * T * world)) * B * T * world
    # forward only: a third of the training FLOPs; CORE's items are not counted
    return _row(ctx, "base_eval", B, auto, sizing.eval_memory(mcfg, B, T, _bytes(ctx, "base_eval")),
                tokens=tokens, seconds=_seconds(ctx, "base_eval", tokens, ctx["fpt"] / 3))


def _chat(ctx, stage: str, size: int | None) -> dict:
    """mid_train (tokens a step) or sft (conversations a step)."""
    c, mcfg, world = getattr(ctx["cfg"], stage), ctx["mcfg"], _world(ctx, stage)
    T = ctx["cfg"].chat_seq_len(stage)
    need = lambda B: sizing.train_memory(mcfg, B, T, _bytes(ctx, stage), _compiled(ctx, stage))["total"]
    if stage == "mid_train":
        B, auto = _fit(ctx, stage, c.device_batch_size, sizing.divisors(max(c.total_batch_size // (T * world), 1)), need)
        accum = sizing.token_grad_accum(stage, c.total_batch_size, B, T, world, "max_seq_len")
        per_step, steps = c.total_batch_size, sizing.mid_steps(size, c.total_batch_size, c.num_iterations) if (
            size or c.num_iterations > 0) else None
        extra = {}
    else:
        B, auto = _fit(ctx, stage, c.device_batch_size, sizing.divisors(max(c.target_examples_per_step // world, 1)), need)
        accum = sizing.row_grad_accum(stage, c.target_examples_per_step, B, world)
        per_step = c.target_examples_per_step * T  # at most: rows are padded to the longest conversation, <= T
        steps = sizing.sft_steps(size, c.target_examples_per_step, c.num_iterations) if (
            size or c.num_iterations > 0) else None
        extra = {"examples_per_step": c.target_examples_per_step, "tokens_per_step_is_max": True}
    tokens = None if steps is None else steps * per_step
    return _row(ctx, stage, B, auto, sizing.train_memory(mcfg, B, T, _bytes(ctx, stage), _compiled(ctx, stage)),
                grad_accum=accum, tokens_per_step=per_step, steps=steps, tokens=tokens, sequence_len=T,
                seconds=_seconds(ctx, stage, tokens, ctx["fpt"]), checkpoint_bytes=_checkpoint_bytes(mcfg, world),
                keep_checkpoints=c.keep_checkpoints, **extra)


def _kv_cache_bytes(mcfg, rows: int, length: int, dtype_bytes: int) -> int:
    return mcfg.n_layer * 2 * rows * mcfg.n_kv_head * length * mcfg.head_dim * dtype_bytes


def _rl(ctx) -> dict:
    """Training rows of up to max_seq_len plus the engine's KV cache; generation time is not estimated."""
    r, mcfg = ctx["cfg"].rl, ctx["mcfg"]
    S = min(r.max_seq_len, mcfg.rotary_seq_len)  # as rl.train
    memory = sizing.train_memory(mcfg, r.device_batch_size, S, _bytes(ctx, "rl"), False)
    memory["kv_cache"] = _kv_cache_bytes(mcfg, r.engine_batch, S, _bytes(ctx, "rl"))
    memory["total"] += memory["kv_cache"]
    return _row(ctx, "rl", r.device_batch_size, False, memory, steps=r.num_iterations if r.num_iterations > 0 else None,
                seconds=None, checkpoint_bytes=_checkpoint_bytes(mcfg, _world(ctx, "rl")),
                keep_checkpoints=r.keep_checkpoints)


def _chat_eval(ctx) -> dict:
    """The weights, the engine's KV cache, and the prefill of a batch of prompts; time not estimated."""
    e, mcfg = ctx["cfg"].chat_eval, ctx["mcfg"]
    S = min(mcfg.rotary_seq_len, max(e.context_len, mcfg.sequence_len))  # the engine's, as stages/chat_eval
    memory = sizing.eval_memory(mcfg, e.batch_size, S, _bytes(ctx, "chat_eval"))
    memory["kv_cache"] = _kv_cache_bytes(mcfg, e.batch_size, S, _bytes(ctx, "chat_eval"))
    memory["total"] += memory["kv_cache"]
    return _row(ctx, "chat_eval", e.batch_size, False, memory, seconds=None)


def _checkpoint_bytes(mcfg, world: int) -> int:
    """One training checkpoint: the fp32 model (rank 0) and every rank's own copy of the optimizer
    state (replicated, see optim.py)."""
    return 4 * sizing.num_params(mcfg) + world * sizing.optimizer_bytes(mcfg)


def _data(cfg, mcfg) -> dict:
    src, d = cfg.data.source, cfg.data
    chars = sizing.source_chars(src.kind, src.num_files, src.sample_parts, src.max_chars)
    cpt = sizing.CHARS_PER_TOKEN.get(src.kind)
    train_chars = None if chars is None else chars * (1 - d.val_fraction)
    tokens = None if train_chars is None or cpt is None else train_chars / cpt
    return {"source": src.kind, "num_files": src.num_files if src.kind == "fineweb-edu" else None,
            "chars": chars, "train_chars": train_chars, "chars_per_token": cpt, "train_tokens": tokens,
            "shard_bytes": None if chars is None else chars * SHARD_BYTES_PER_CHAR,
            "download_bytes": chars * SHARD_BYTES_PER_CHAR if src.kind == "fineweb-edu" else 0,
            "seconds": 0.0 if chars is None else chars / DATA_STAGE_CHARS_PER_S}


def _store(cfg, mcfg, stages: dict, data: dict) -> dict:
    """Store space: committed outputs (data shards, the fp32 model of each training stage, the export)
    plus, at the peak, the checkpoints the largest training stage keeps in its _work dir (removed
    when it commits)."""
    model = 4 * sizing.num_params(mcfg)
    models = {s: model for s in ("base_train", "mid_train", "sft", "rl")}
    models["export"] = model // (2 if cfg.export.dtype == "bfloat16" else 1)
    working = max(s["checkpoint_bytes"] * s["keep_checkpoints"] for s in stages.values() if "checkpoint_bytes" in s)
    shards = data["shard_bytes"] or 0
    return {"data_shards": shards, "models": models, "checkpoints_peak": working,
            "total_peak": shards + sum(models.values()) + working, "download_cache": data["download_bytes"]}


# ----- text -----

def _gb(b: float | None) -> str:
    return "?" if b is None else f"{b / 1e9:,.1f} GB" if b >= 1e9 else f"{b / 1e6:,.0f} MB"


def _gib(b: float) -> str:
    return f"{b / sizing.GiB:.1f} GiB"


def _hours(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def _int(v) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.0f}"


def render(p: dict) -> str:
    """The plan as text: a header, one column per torchrun stage, then data, store and totals."""
    m, d = p["model"], p["data"]
    price = "no price" if p["price_per_gpu_hour"] is None else f"${p['price_per_gpu_hour']:.2f}/GPU-hour"
    lines = [f"nanopipe plan: preset {p['preset']} | {p['gpu']} ({p['gpu_memory_gib']:.0f} GiB, "
             f"{p['gpu_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16; {_gib(p['memory_budget_bytes'])} usable per GPU) | "
             f"MFU {p['mfu']:.0%} | {price}",
             f"model: depth {m['depth']}, width {m['n_embd']}, {m['n_head']} heads, vocab {m['vocab_size']:,}, "
             f"sequence {m['sequence_len']:,} | {m['params']:,} parameters | {m['flops_per_token']:.3e} FLOPs/token", ""]
    names = list(p["stages"])
    rows = [("device", lambda s: f"{s['world']} x {s['device']}")]
    rows += [("device batch (rows)", lambda s: f"{s['device_batch_size']}{' (auto)' if s['auto'] else ''}"),
             ("grad accumulation", lambda s: _int(s.get("grad_accum"))),
             ("tokens / step", lambda s: ("<= " if s.get("tokens_per_step_is_max") else "") + _int(s.get("tokens_per_step"))),
             ("steps", lambda s: _int(s.get("steps")) if s.get("steps") is not None or "tokens_per_step" not in s
              else "1 epoch (?)"),
             ("tokens", lambda s: _int(s.get("tokens"))),
             ("data passes", lambda s: "-" if s.get("data_passes") is None else f"{s['data_passes']:.2f} (est.)"),
             ("peak memory / GPU", lambda s: _gib(s["memory"]["total"]) + ("" if s["fits"] else " DOES NOT FIT")),
             ("  params+grads+optim", lambda s: _gib(sum(s["memory"].get(k, 0) for k in ("params", "grads", "optimizer")))),
             ("  activations", lambda s: _gib(s["memory"]["activations"])),
             ("  logits", lambda s: _gib(s["memory"]["logits"])),
             ("  KV cache", lambda s: _gib(s["memory"]["kv_cache"]) if "kv_cache" in s["memory"] else "-"),
             ("checkpoint", lambda s: _gb(s.get("checkpoint_bytes")) if "checkpoint_bytes" in s else "-"),
             ("time", lambda s: _hours(s["seconds"]) if s["seconds"] is not None else "-"),
             ("GPU-hours", lambda s: "-" if s["gpu_hours"] is None else f"{s['gpu_hours']:.1f}")]
    table = [[""] + names] + [[label] + [fn(p["stages"][n]) for n in names] for label, fn in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    if d["chars"] is None:
        lines += ["", f"data: {d['source']} source: its size is unknown before reading it"]
    else:
        files = f"{d['num_files']} files x >= 250M chars = " if d["num_files"] else ""
        lines += ["", f"data: {d['source']}: {files}{d['chars'] / 1e9:,.2f}B chars; train tokens ~{_int(d['train_tokens'])} "
                      f"at ~{d['chars_per_token']} chars/token (base_train measures it and refuses to repeat data); "
                      f"shards {_gb(d['shard_bytes'])}; data stage ~{_hours(d['seconds'])} at "
                      f"{DATA_STAGE_CHARS_PER_S / 1e6:.0f}M chars/s (all on one core)"
                      + (f"; download {_gb(d['download_bytes'])}" if d["download_bytes"] else "")]
    st = p["store"]
    models = ", ".join(f"{k} {_gb(v)}" for k, v in st["models"].items())
    lines.append(f"store: data {_gb(st['data_shards'])} + models ({models}) + checkpoints kept while training "
                 f"{_gb(st['checkpoints_peak'])} = {_gb(st['total_peak'])} at the peak"
                 + (f"; download cache {_gb(st['download_cache'])}" if st["download_cache"] else ""))
    t = p["total"]
    cost = "" if t["cost_usd"] is None else f", ${t['cost_usd']:,.0f}"
    lines.append(f"total: ~{_hours(t['seconds'])}, {t['gpu_hours']:.1f} GPU-hours{cost} (data stage and timed stages"
                 + (f"; not timed: {', '.join(t['not_timed'])}" if t["not_timed"] else "") + ")")
    too_big = [n for n, s in p["stages"].items() if not s["fits"]]
    if too_big:
        auto = [n for n in too_big if n in AUTO_STAGES and not p["stages"][n]["auto"]]
        lines.append(f"does not fit a {p['gpu']}: {', '.join(too_big)}"
                     + (f"; let it pick: {' '.join(f'--set {n}.device_batch_size=auto' for n in auto)}" if auto else "")
                     + (f"; lower {', '.join(AUTO_LESS[n] for n in too_big if n in AUTO_LESS)}"
                        if any(n in AUTO_LESS for n in too_big) else ""))
    if any(s["steps"] is None for n, s in p["stages"].items() if n in CHAT_STAGES):
        lines.append("mid_train/sft train one epoch of their mixtures, whose size is known once built: "
                     "pass --mid-tokens / --sft-conversations to time them")
    return "\n".join(lines)
