"""nanochat's own pretraining step, timed for bench/train.py in a process of its own.

    python bench/nanochat_step.py --nanochat DIR --shape '{"depth": 6, ...}'

Imports torch and nanochat only (DIR: a checkout, put first on sys.path), and does what nanochat's
scripts/base_train.py does, with its code: GPT built on the meta device, to_empty, init_weights,
torch.compile(dynamic=False); setup_optimizers() (Muon + AdamW); then the body of its training loop
on fixed random batches: gradient-accumulated forward/backward (autocast on CUDA only), gradient
clipping, the LR and Muon momentum writes, the optimizer steps, zero_grad. No data loader, tokenizer
or downloads: the vocabulary size is given.

Protocol, one JSON object a line: after two warm-up steps (compilation) it prints
{"params", "flops_per_token", "tokens_per_step"}; then each line "N" read from stdin runs one untimed
step and N timed ones, answers {"step_s": seconds per step}, and hands its freed heap back to the
system (glibc malloc_trim) while it waits. End of input ends it.
"""

import argparse
import contextlib
import ctypes
import json
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat", required=True, help="a nanochat checkout (the directory holding nanochat/)")
    ap.add_argument("--shape", required=True, help="JSON: depth, head_dim, seq, rows, batch, vocab")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    protocol, sys.stdout = sys.stdout, sys.stderr  # nanochat prints as it sets up; keep stdout for the protocol
    sys.path.insert(0, a.nanochat)
    from nanochat.gpt import GPT, GPTConfig

    s = json.loads(a.shape)
    device = torch.device(a.device)
    dim = 64 * s["depth"]
    heads = dim // s["head_dim"]
    config = GPTConfig(sequence_len=s["seq"], vocab_size=s["vocab"], n_layer=s["depth"], n_head=heads,
                       n_kv_head=heads, n_embd=dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    compiled = torch.compile(model, dynamic=False)
    optimizers = model.setup_optimizers()
    muon = optimizers[1]
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    accum = max(1, s["batch"] // (s["rows"] * s["seq"]))
    x = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)
    y = torch.randint(0, s["vocab"], (s["rows"], s["seq"]), device=device)

    def step() -> None:
        for _ in range(accum):
            with autocast:
                loss = compiled(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"]
        for group in muon.param_groups:
            group["momentum"] = 0.95
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(2):
        step()
    sync()
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "flops_per_token": model.estimate_flops(),
                      "tokens_per_step": accum * s["rows"] * s["seq"]}), file=protocol, flush=True)
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    for line in sys.stdin:
        n = int(line)
        step()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        print(json.dumps({"step_s": (time.perf_counter() - t0) / n}), file=protocol, flush=True)
        if trim:
            trim(0)


if __name__ == "__main__":
    main()
