"""
Inference: a preallocated KV cache, one prefill per prompt then token-by-token decode,
sampling, tool use, and continuous batching of independent requests.

Layout. The cache is one tensor [n_layer, 2 (k, v), rows, n_kv_head, capacity, head_dim].
Each active sequence ("row": one sample of one request) owns row i of it, left-aligned: its
token at position p sits at column p. Rows have different lengths, so a decode step gives
every row its own rotary position and an attention mask built from the lengths (SDPA with an
explicit mask). Requests join between steps (their prompts are prefilled, several at once,
right-padded) and leave between steps (the last row moves into the hole, so active rows are
always 0..n-1 and every tensor is a plain slice).

Why not model.forward: its KV-cache protocol (a scalar `pos` shared by the batch, no mask)
cannot express rows at different positions, so the engine runs the same blocks itself with
the model's own helpers and weights (q, k and v in one matmul, through a stacked copy of their
weights that is rebuilt whenever an optimizer step changes them). tests/test_engine.py checks
it token for token against model.forward.

Precision: nanopipe.device decides. On CUDA the forward runs under bf16 autocast, with the weights
kept in a bf16 copy (rebuilt like the stacked one), so a decode step reads 2 bytes per weight rather
than casting 4-byte weights every step, and the KV cache is bf16 (what attention consumes). On CPU
everything is fp32, as the model is: no copies, the same numbers as model.forward.

Tool use. A row that samples <|python_start|> code <|python_end|> gets the code run:
sandbox.calculator for arithmetic, else sandbox.run_python (time and memory limits) in a
worker thread, while the other rows keep decoding. The engine then forces <|output_start|>
result <|output_end|> into the row, one token per step, fed through the model like prompt
tokens and marked forced (mask 0) in the results.

Sampling: temperature (0 = greedy), top-k, top-p. Each row has its own torch.Generator seeded
from (request seed, sample index), so a seeded request gives the same samples whatever else
shares the batch and however long tools take. A temperature below MIN_TEMPERATURE (too small
to divide by) is greedy.

Errors stay in their row: a request whose logits are not finite, or whose sampling fails, ends
(each sample with finish_reason "error", the reason in request.error) and every other row goes on.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait, FIRST_COMPLETED
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanopipe.device import autocast_for, compute_dtype, setup_device
from nanopipe.model import LOGIT_SOFTCAP, GPT, apply_rotary, norm
from nanopipe.sandbox import calculator, isolation, run_python
from nanopipe.tokenizer import Tokenizer

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy: logits / temperature would overflow
MAX_TOOL_OUTPUT_CHARS = 1000  # a tool's answer goes into the context: keep it short
_PREFILL_PAD_WASTE = 1.5  # prompts prefill together while padded tokens <= this x real tokens


@dataclass
class SamplingParams:
    max_tokens: int = 256  # generated tokens per sample, tool outputs included
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: fresh entropy
    num_samples: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def check(self, vocab_size: int) -> None:
        """ValueError naming the first bad field."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or not 1 <= self.top_k <= vocab_size):
            raise ValueError(f"top_k must be None or an int in [1, {vocab_size}], got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if not is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")


@dataclass(frozen=True)
class TokenEvent:
    """One token of one sample, or (token None) the end of that sample."""
    request_id: int
    sample: int
    token: int | None
    forced: bool = False  # written by the engine (tool output), not sampled
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the final event


class Request:
    """A prompt being completed: per sample, the generated tokens (the stop token is not
    included), their mask (1 sampled, 0 forced by a tool) and why it ended."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        n = params.num_samples
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.masks: list[list[int]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.cancelled = False
        self.error: str | None = None  # why it ended with "error"

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, prompt={len(self.prompt)} tokens, samples={len(self.tokens)})"


@dataclass(eq=False)
class _Row:
    request: Request
    sample: int
    generator: torch.Generator | None
    length: int = 0  # tokens in the cache
    last: int | None = None  # the next token to feed; None while waiting for a tool's answer
    generated: int = 0
    forced: deque = field(default_factory=deque)
    code: list[int] | None = None  # tokens of a tool call being written
    tool: Future | None = None  # a sandbox run in flight


class KVCache:
    """Keys and values of every layer: [n_layer, 2, rows, n_kv_head, capacity, head_dim].
    Capacity (positions) grows by doubling up to max_len, so short chats stay small."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, rows: int, max_len: int,
                 device, dtype, capacity: int = 256):
        self.max_len = max_len
        self.kv = torch.zeros(n_layer, 2, rows, n_kv_head, min(capacity, max_len), head_dim,
                              device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.kv.size(4)

    def reserve(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's max_len {self.max_len}")
        if length <= self.capacity:
            return
        new_cap = min(self.max_len, max(length, 2 * self.capacity))
        shape = list(self.kv.shape)
        shape[4] = new_cap
        grown = self.kv.new_zeros(shape)
        grown[:, :, :, :, :self.capacity] = self.kv
        self.kv = grown

    def copy_rows(self, src: int, dst: slice, length: int) -> None:
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src:src + 1, :, :length]


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities to sample from: temperature (> 0), then the top_k
    most likely tokens, then the smallest set of those holding top_p of the probability."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the more likely ones already hold top_p (the most likely always stays)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 (below MIN_TEMPERATURE) is greedy (argmax)."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def default_tool(code: str, timeout: float = 5.0, memory_mb: int = 256) -> str:
    """The python tool: arithmetic through the calculator, anything else in the sandbox.
    Returns what the program printed, or its error, cut to MAX_TOOL_OUTPUT_CHARS."""
    answer = calculator(code)
    if answer is None:
        result = run_python(code, timeout=timeout, memory_mb=memory_mb)
        answer = result.stdout if result.ok else (result.stdout + (result.error or "")).strip()
    answer = answer.strip()
    if len(answer) > MAX_TOOL_OUTPUT_CHARS:
        answer = answer[:MAX_TOOL_OUTPUT_CHARS] + " ..."
    return answer


class Engine:
    """Continuous-batching generator over a GPT and its tokenizer.

    Drive it either with the one-call helpers (generate, generate_batch, generate_many) or,
    as the server does, with add_request / cancel / step from a single thread. `stop_ids`
    (<|assistant_end|>, <|bos|>) end a sample; benchmarks may empty it. `dtype` is the compute dtype
    (of the KV cache too); None: nanopipe.device.compute_dtype of the model's device.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16, max_seq_len: int | None = None,
                 tools: bool = True, tool_timeout: float = 5.0, tool_memory_mb: int = 256,
                 dtype: torch.dtype | None = None):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        cfg = model.config
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                             f"is {cfg.vocab_size}: they were not trained together")
        max_seq_len = cfg.sequence_len if max_seq_len is None else max_seq_len
        if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= model.rotary_seq_len:
            raise ValueError(f"max_seq_len must be an int in [2, {model.rotary_seq_len}] "
                             f"(the model's rotary table), got {max_seq_len!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.tools = tools
        if tools:
            isolation()  # find the sandbox now: a warning at start (once) if model-written code would run unisolated
        self.tool_timeout = tool_timeout
        self.tool_memory_mb = tool_memory_mb
        self.vocab_size = cfg.vocab_size
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.gqa = cfg.n_kv_head != cfg.n_head
        sid = tokenizer.id_of
        self.stop_ids = frozenset({sid("<|assistant_end|>"), tokenizer.bos_id})
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")

        self.device = model.get_device()
        self.dtype = compute_dtype(self.device) if dtype is None else dtype
        self.cache = KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, max_batch, max_seq_len,
                             self.device, self.dtype)
        self.rows: list[_Row] = []  # active rows; rows[i] owns cache row i
        self.waiting: deque[Request] = deque()  # not admitted yet (no free rows)
        self._ids = itertools.count()
        self._tool_pool: ThreadPoolExecutor | None = None
        self._weights: dict[tuple, tuple] = {}  # (what, layer) -> (params, their versions, weight in self.dtype)
        self._arange = torch.arange(max_batch, device=self.device)
        self.tokens_generated = 0

    # --- requests

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, **kwargs) -> Request:
        """Queue a prompt (token ids, usually ending with <|assistant_start|>); step() admits it
        as soon as num_samples rows are free. kwargs are SamplingParams fields."""
        params = SamplingParams(**kwargs) if params is None else params
        params.check(self.vocab_size)
        if params.num_samples > self.max_batch:
            raise ValueError(f"num_samples {params.num_samples} exceeds the engine's max_batch {self.max_batch}")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty list of token ids")
        prompt = list(prompt)
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt holds {bad[0]!r}, not a token id in [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate: "
                             f"the context is {self.max_seq_len} tokens")
        request = Request(next(self._ids), prompt, params)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its unfinished samples end with finish_reason "cancelled" at the next step()."""
        request.cancelled = True

    def reset(self) -> None:
        """Forget every request, without events (after an error left the batch in an unknown
        state; the caller tells its clients)."""
        for row in self.rows:
            if row.tool is not None:
                row.tool.cancel()
        self.rows.clear()
        self.waiting.clear()

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def active_requests(self) -> int:
        return len({id(r.request) for r in self.rows})

    # --- the loop

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefill), then decode one token for every active row.
        Returns the events of this step, in order; each request also records them."""
        with autocast_for(self.device, self.dtype):  # here, not by the caller: the server steps in its own thread
            return self._step()

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_cancelled(events)
        if self._admit(events):
            # return the new requests' first tokens now (time to first token = their prefill)
            self._remove_finished()
            return events
        self._collect_tools(events)
        ready = [i for i, row in enumerate(self.rows) if row.last is not None]
        if ready:
            logits = self._decode()
            self._sample_and_emit(ready, logits if len(ready) == len(self.rows) else logits[ready], events)
        elif self.rows:
            # every row waits for a tool: sleep until one answers rather than spin
            wait([r.tool for r in self.rows if r.tool is not None], timeout=0.05, return_when=FIRST_COMPLETED)
        self._remove_finished()
        return events

    def _drop_cancelled(self, events: list[TokenEvent]) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            for s in range(len(request.tokens)):
                self._finish_sample(request, s, "cancelled", events)
        for row in self.rows:
            if row.request.finish_reasons[row.sample] is None:
                if row.request.cancelled:
                    self._finish(row, "cancelled", events)
                elif row.request.error is not None:  # a sibling sample failed (e.g. while this one waited on a tool)
                    self._finish(row, "error", events)
        self._remove_finished()

    def _admit(self, events: list[TokenEvent]) -> bool:
        admitted: list[Request] = []
        free = self.max_batch - len(self.rows)
        while self.waiting and self.waiting[0].params.num_samples <= free:  # FIFO: no overtaking
            request = self.waiting.popleft()
            free -= request.params.num_samples
            admitted.append(request)
        if not admitted:
            return False
        # prefill prompts of similar length together (sorted; a group stops once padding would dominate)
        admitted.sort(key=lambda r: len(r.prompt))
        group: list[Request] = []
        for request in admitted:
            longest = len(request.prompt)
            if group and longest * (len(group) + 1) > _PREFILL_PAD_WASTE * (
                    sum(len(r.prompt) for r in group) + longest):
                self._prefill_group(group, events)
                group = []
            group.append(request)
        self._prefill_group(group, events)
        return True

    def _prefill_group(self, group: list[Request], events: list[TokenEvent]) -> None:
        start = len(self.rows)
        slots = []
        for request in group:
            slots.append(len(self.rows))
            for s in range(request.params.num_samples):
                self.rows.append(self._new_row(request, s))
        logits = self._prefill([r.prompt for r in group], slots)
        # several samples of one prompt share its prefill: copy the cache row, repeat the logits
        row_logits = []
        for request, slot, lg in zip(group, slots, logits):
            n, length = request.params.num_samples, len(request.prompt)
            if n > 1:
                self.cache.copy_rows(slot, slice(slot + 1, slot + n), length)
            for i in range(n):
                self.rows[slot + i].length = length
            row_logits.append(lg.expand(n, -1))
        self._sample_and_emit(list(range(start, len(self.rows))), torch.cat(row_logits), events)

    def _new_row(self, request: Request, sample: int) -> _Row:
        gen = None
        if not request.params.greedy:
            seed = request.params.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            gen = torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + sample) % (1 << 63))
        return _Row(request, sample, gen)

    def _collect_tools(self, events: list[TokenEvent]) -> None:
        for row in self.rows:
            if row.tool is not None and row.tool.done():
                try:
                    answer = row.tool.result()
                except Exception as e:  # a broken tool must not take the engine down
                    answer = f"tool error: {type(e).__name__}: {e}"
                row.tool = None
                row.forced.extend(self._output_tokens(answer))
                if row.last is None:
                    self._emit(row, row.forced.popleft(), True, events)

    def _sample_and_emit(self, ready: list[int], logits: torch.Tensor, events: list[TokenEvent]) -> None:
        """ready[j] is the row whose next-token logits are logits[j]."""
        rows = [self.rows[i] for i in ready]
        for row, token in zip(rows, self._choose(rows, logits)):
            row.last = None
            if row.request.error is not None:
                self._finish(row, "error", events)  # this request failed; the others go on
            elif row.length >= self.max_seq_len:
                self._finish(row, "length", events)  # the context is full
            elif row.forced:
                self._emit(row, row.forced.popleft(), True, events)
            elif row.tool is None:
                self._emit(row, token, False, events)
            # else: the tool has not answered; the row idles until it does

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The sampled next token of each row: greedy rows in one argmax; sampled rows filtered
        per request (shared settings) and drawn per row (own generator). A request whose logits
        are not finite, or whose sampling raises, gets request.error (its rows' tokens are unused)."""
        bad = (~torch.isfinite(logits).all(dim=-1)).tolist()
        for row, nonfinite in zip(rows, bad):
            if nonfinite and row.request.error is None:
                row.request.error = "the model produced non-finite logits"
        if all(r.generator is None for r in rows):
            return logits.argmax(dim=-1).tolist()
        chosen = [0] * len(rows)
        greedy = [j for j, r in enumerate(rows) if r.generator is None]
        if greedy:
            for j, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                chosen[j] = t
        by_request: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            if r.generator is not None and r.request.error is None:
                by_request.setdefault(r.request.id, []).append(j)
        for js in by_request.values():
            request = rows[js[0]].request
            p = request.params
            try:
                probs = sampling_probs(logits[js] if len(js) < len(rows) else logits, p.temperature, p.top_k, p.top_p)
                for j, row_probs in zip(js, probs):
                    chosen[j] = int(torch.multinomial(row_probs, 1, generator=rows[j].generator))
            except (RuntimeError, ValueError) as e:  # e.g. "probability tensor contains inf/nan"
                request.error = f"sampling failed: {e}"
        return chosen

    def _emit(self, row: _Row, token: int, forced: bool, events: list[TokenEvent]) -> None:
        request = row.request
        if not forced and token in self.stop_ids:
            self._finish(row, "stop", events)
            return
        request.tokens[row.sample].append(token)
        request.masks[row.sample].append(0 if forced else 1)
        events.append(TokenEvent(request.id, row.sample, token, forced))
        row.generated += 1
        self.tokens_generated += 1
        if self.tools and not forced:
            self._track_tool_call(row, token)
        if row.generated >= request.params.max_tokens:
            self._finish(row, "length", events)
        else:
            row.last = token

    def _track_tool_call(self, row: _Row, token: int) -> None:
        if row.code is None:
            if token == self.python_start:
                row.code = []
        elif token == self.python_end:
            code, row.code = self.tokenizer.decode(row.code), None
            answer = calculator(code)
            if answer is not None:
                row.forced.extend(self._output_tokens(answer))
            else:
                if self._tool_pool is None:
                    self._tool_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanopipe-tool")
                row.tool = self._tool_pool.submit(default_tool, code, self.tool_timeout, self.tool_memory_mb)
        else:
            row.code.append(token)

    def _output_tokens(self, answer: str) -> list[int]:
        return [self.output_start] + self.tokenizer.encode(answer) + [self.output_end]

    def _finish(self, row: _Row, reason: str, events: list[TokenEvent]) -> None:
        row.last = None
        if row.tool is not None:
            row.tool.cancel()
            row.tool = None
        self._finish_sample(row.request, row.sample, reason, events)

    @staticmethod
    def _finish_sample(request: Request, sample: int, reason: str, events: list[TokenEvent]) -> None:
        request.finish_reasons[sample] = reason
        events.append(TokenEvent(request.id, sample, None, False, reason))

    def _remove_finished(self) -> None:
        """Drop finished rows, moving the last active row into each hole (rows stay 0..n-1)."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.request.finish_reasons[row.sample] is None:
                i += 1
                continue
            last = self.rows.pop()
            if last is not row:
                self.cache.kv[:, :, i, :, :last.length] = self.cache.kv[:, :, len(self.rows), :, :last.length]
                self.rows[i] = last

    # --- the model, run by hand (see the module docstring)

    def _weight(self, key: tuple, *params: torch.Tensor) -> torch.Tensor:
        """params (stacked into one matrix when several: c_q, c_k, c_v make one matmul) in the
        compute dtype, rebuilt whenever the model's weights change (an optimizer step bumps their
        versions). In fp32 a single weight is the parameter itself, not a copy."""
        versions = tuple(p._version for p in params)
        cached = self._weights.get(key)
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], params)):
            weight = torch.cat(params) if len(params) > 1 else params[0]
            cached = (params, versions, weight.to(self.dtype))
            self._weights[key] = cached
        return cached[2]

    def _block_rest(self, layer: int, block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The rest of a block after attention: its output projection, then the MLP (relu^2, as
        model.MLP), both residual."""
        x = x + F.linear(y.transpose(1, 2).reshape(x.shape), self._weight(("attn_proj", layer), block.attn.c_proj.weight))
        h = F.relu(F.linear(norm(x), self._weight(("fc", layer), block.mlp.c_fc.weight))).square()
        return x + F.linear(h, self._weight(("mlp_proj", layer), block.mlp.c_proj.weight))

    def _qkv(self, layer: int, attn, x, cos, sin):
        """The model's attention inputs: q, k, v (B, heads, T, head_dim), rotary and QK norm
        applied to q and k together."""
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = F.linear(x, self._weight(("qkv", layer), attn.c_q.weight, attn.c_k.weight, attn.c_v.weight))
        qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim)
        qk = norm(apply_rotary(qkv[:, :, :H + Hkv], cos, sin))
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) final hidden states -> (B, vocab_size) soft-capped fp32 logits; the padded
        rows of lm_head are never computed."""
        logits = F.linear(norm(x), self._weight(("lm_head",), self.model.lm_head.weight)[:self.vocab_size])
        return torch.tanh(logits.float() / LOGIT_SOFTCAP) * LOGIT_SOFTCAP

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run prompts (right-padded; causal attention keeps the padding out of real positions)
        from position 0, caching their keys/values in rows `slots`. -> (B, V) last-token logits."""
        lens = [len(p) for p in prompts]
        T = max(lens)
        self.cache.reserve(T + 1)
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        B = idx.size(0)
        contiguous = slots == list(range(slots[0], slots[0] + B))
        where = slice(slots[0], slots[0] + B) if contiguous else torch.tensor(slots, device=self.device)
        cos, sin = self.model.cos[:, :T], self.model.sin[:, :T]
        x = norm(self.model.transformer.wte(idx))
        for layer, block in enumerate(self.model.transformer.h):
            q, k, v = self._qkv(layer, block.attn, norm(x), cos, sin)
            # .to: autocast may leave k (after the norm) in fp32; indexed writes need the cache's dtype
            self.cache.kv[layer, 0, where, :, :T] = k.to(self.dtype)
            self.cache.kv[layer, 1, where, :, :T] = v.to(self.dtype)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
            x = self._block_rest(layer, block, x, y)
        last = x[torch.arange(B, device=self.device), torch.tensor(lens, device=self.device) - 1]
        return self._logits(last)

    def _decode(self) -> torch.Tensor:
        """One token for each active row at its own position -> (n, V) logits. Rows waiting for
        a tool feed a dummy token at their next free position (overwritten before it is ever
        attended) and do not advance."""
        n = len(self.rows)
        positions = [row.length for row in self.rows]
        Tk = max(positions) + 1
        self.cache.reserve(Tk)
        tokens = torch.tensor([0 if row.last is None else row.last for row in self.rows], device=self.device)
        pos = torch.tensor(positions, device=self.device)
        rows = self._arange[:n]
        cos, sin = self.model.cos[0, pos][:, None], self.model.sin[0, pos][:, None]  # (n, 1, 1, D)
        # each row attends to its own positions 0..pos; no mask needed when all rows agree
        mask = None if min(positions) == Tk - 1 else (self._arange_t(Tk) <= pos[:, None]).view(n, 1, 1, Tk)
        kv = self.cache.kv
        x = norm(self.model.transformer.wte(tokens[:, None]))  # (n, 1, C)
        for layer, block in enumerate(self.model.transformer.h):
            q, k, v = self._qkv(layer, block.attn, norm(x), cos, sin)
            kv[layer, 0, rows, :, pos] = k[:, :, 0].to(self.dtype)
            kv[layer, 1, rows, :, pos] = v[:, :, 0].to(self.dtype)
            y = F.scaled_dot_product_attention(q, kv[layer, 0, :n, :, :Tk], kv[layer, 1, :n, :, :Tk],
                                               attn_mask=mask, enable_gqa=self.gqa)
            x = self._block_rest(layer, block, x, y)
        for row in self.rows:
            if row.last is not None:
                row.length += 1
        return self._logits(x[:, 0])

    def _arange_t(self, T: int) -> torch.Tensor:
        if getattr(self, "_arange_T", None) is None or self._arange_T.numel() < T:
            self._arange_T = torch.arange(self.max_seq_len, device=self.device)
        return self._arange_T[:T]

    # --- one-call helpers

    def generate(self, prompt: list[int], **kwargs):
        """Yield the TokenEvents of one new request until all its samples end.
        kwargs are SamplingParams fields. Other requests in the engine advance too."""
        request = self.add_request(prompt, **kwargs)
        try:
            while not request.done:
                for event in self.step():
                    if event.request_id == request.id:
                        yield event
        finally:
            if not request.done:  # the caller stopped early
                self.cancel(request)
                self.step()

    def generate_batch(self, prompt: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """nanochat's interface: (results, masks), one per sample; a result is the prompt plus
        the generated tokens (no stop token); a mask is 0 for prompt and forced tool tokens, 1 for sampled."""
        (request,) = self.generate_many([prompt], num_samples=num_samples, **kwargs)
        results = [list(request.prompt) + toks for toks in request.tokens]
        masks = [[0] * len(request.prompt) + m for m in request.masks]
        return results, masks

    def generate_many(self, prompts: list[list[int]], **kwargs) -> list[Request]:
        """Complete many prompts with continuous batching; returns the finished requests in order."""
        requests = [self.add_request(p, **kwargs) for p in prompts]
        while not all(r.done for r in requests):
            self.step()
        return requests

    def close(self) -> None:
        if self._tool_pool is not None:
            self._tool_pool.shutdown(wait=False, cancel_futures=True)


@torch.inference_mode()
def generate_without_cache(model: GPT, prompt: list[int], max_tokens: int,
                           stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy decoding the naive way: the full forward over the whole sequence for every token.
    The reference the KV-cache engine must match, and the baseline of bench/inference.py."""
    device = model.get_device()
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=device))
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out


class TextStream:
    """Incremental detokenizer: push(token) returns the text that is now complete. A byte-level
    BPE token can end inside a UTF-8 character, so text ending in U+FFFD is held back until the
    next tokens complete it (or 4 tokens pass: then it really is U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def load_engine(store_url: str | None = None, model: str | None = None, device: str = "auto",
                **engine_kwargs) -> tuple[Engine, str]:
    """An Engine over a committed checkpoint: `model` is a stage name or key prefix (None: the
    newest of the most finished stage), on `device` (auto, cpu or cuda; see nanopipe.device).
    Returns (engine, "stage/key12") naming the checkpoint."""
    from nanopipe.loading import find_model, load_model, load_tokenizer, tokenizer_of
    from nanopipe.store import Store

    store = Store(store_url)
    manifest = find_model(store, model)
    gpt = load_model(store, manifest, device=setup_device(device))
    tok = load_tokenizer(store, tokenizer_of(store, manifest))
    return Engine(gpt, tok, **engine_kwargs), f"{manifest['stage']}/{manifest['key'][:12]}"
