"""Stage 9b: serve the chat model for real — start the server on 127.0.0.1, send chat requests
through its OpenAI-compatible API, record latency and throughput, and stop it.

The server a user keeps running is `nanopipe serve`; this stage proves the committed model
serves, and measures it, every time the model changes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx

from nanopipe import loading
from nanopipe.device import setup_device
from nanopipe.engine import Engine
from nanopipe.serve.app import create_app

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
# /stats fields that measure time: metrics, not serve_probe.json (whose bytes key the report).
_TIMED_STATS = ("uptime_s", "tokens_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_one(base: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": "nanopipe", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.perf_counter()
    first, chunks, text = None, 0, []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"serve: POST /v1/chat/completions answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                chunks += 1
                text.append(delta)
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "seconds": end - t0, "chunks": chunks, "text": "".join(text)}


def run(ctx: "StageContext") -> dict:
    import uvicorn

    cfg = ctx.config
    model_manifest = ctx.upstream["sft"]
    model = loading.load_model(ctx.store, model_manifest, setup_device(cfg.device))  # CUDA: TF32; the engine: bf16
    tok = loading.load_tokenizer(ctx.store, ctx.upstream["tokenizer"])
    engine = Engine(model, tok, max_batch=cfg.concurrency)
    name = f"sft/{model_manifest['key'][:16]}"
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name=name), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("serve: the server did not start within 60 s")
            time.sleep(0.05)
        health = httpx.get(f"{base}/health", timeout=10).json()
        single = _stream_one(base, cfg.prompts[0], cfg.max_tokens, cfg.timeout_s)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            many = list(pool.map(lambda i: _stream_one(base, cfg.prompts[i % len(cfg.prompts)], cfg.max_tokens,
                                                       cfg.timeout_s), range(cfg.concurrency)))
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{base}/stats", timeout=10).json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    metrics = {"model": name, "ttft_ms": round(1000 * single["ttft_s"], 1),
               "single_tokens_per_s": round(single["chunks"] / max(single["seconds"] - single["ttft_s"], 1e-9), 1),
               "concurrency": cfg.concurrency,
               "aggregate_tokens_per_s": round(sum(r["chunks"] for r in many) / wall, 1),
               "p50_latency_s": round(sorted(r["seconds"] for r in many)[len(many) // 2], 3),
               "server": {k: stats.pop(k) for k in _TIMED_STATS}}
    # The probe file keeps what the model answered (greedy: the same every run), not how fast, nor how
    # the stream happened to be cut into chunks (that depends on timing too).
    ctx.writer.write_json("serve_probe.json", {"health": health, "stats": stats, "model": name,
                                               "single": single["text"], "concurrent": [r["text"] for r in many]})
    ctx.log(f"[serve] {name}: TTFT {metrics['ttft_ms']} ms, {metrics['single_tokens_per_s']} tok/s alone, "
            f"{metrics['aggregate_tokens_per_s']} tok/s over {cfg.concurrency} streams; reply: {single['text'][:80]!r}")
    return metrics
