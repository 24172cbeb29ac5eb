"""Stage 9b: serve the chat model for real — start the server on 127.0.0.1, send chat requests
through its OpenAI-compatible API, record latency and throughput, and stop it.

The server is `nanopipe serve` itself, the one a user keeps running, started as a child process
(nanopipe.launch.background: killed with its process group when the stage ends, is cancelled or
dies). Not a thread of this process: uvicorn configures logging for the whole process it runs
in (logging.config.dictConfig), which inside a Prefect worker flushes Prefect's API log handler
while holding logging's lock, and deadlocks against the other stages' threads that log.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

from nanopipe.launch import background
# The server's own answer schemas: the probe checks its answers against them, and importing them
# puts the server's code (the app, the engine, the model) in this stage's key (nanopipe.codeid).
from nanopipe.serve.app import Health, Stats

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
START_TIMEOUT_S = 180  # loading torch and the model in the child, on a loaded machine
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


def _wait_until_up(base: str, server, key: str, log_path: str) -> dict:
    """The server's /health once it answers as the server of the model `key` (not some other
    process that took the port); an error naming the log if it exits or stays silent."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"serve: the server exited with code {server.returncode} before answering; log: {log_path}")
        try:
            r = httpx.get(f"{base}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        try:
            model = Health.model_validate_json(r.text).model if r.status_code == 200 else ""
        except ValidationError:
            model = ""
        if not (model.startswith("sft/") and key.startswith(model[len("sft/"):])):
            raise RuntimeError(f"serve: {base} answers, but not as the server of sft/{key[:16]}: {r.text[:200]}")
        return r.json()
    raise RuntimeError(f"serve: the server did not answer within {START_TIMEOUT_S} s; log: {log_path}")


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    model_key = ctx.upstream["sft"]["key"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nanopipe", "serve", "--store", ctx.store.url, "--model", model_key,
           "--host", "127.0.0.1", "--port", port, "--device", cfg.device, "--max-concurrency", cfg.concurrency]
    log_path = ctx.store.local_launch_log(ctx.stage, ctx.key)
    with background(cmd, log_path, on_line=lambda line: ctx.log(f"[serve] server: {line}")) as server:
        health = _wait_until_up(base, server, model_key, log_path)
        name = health["model"]
        single = _stream_one(base, cfg.prompts[0], cfg.max_tokens, cfg.timeout_s)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            many = list(pool.map(lambda i: _stream_one(base, cfg.prompts[i % len(cfg.prompts)], cfg.max_tokens,
                                                       cfg.timeout_s), range(cfg.concurrency)))
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{base}/stats", timeout=10).json()
        Stats.model_validate(stats)
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
