"""
The HTTP server: a chat web page, a streaming chat endpoint for it, and an OpenAI-compatible API.

    GET  /                     the chat page (static/)
    POST /chat/completions     the page's endpoint: server-sent events {"text": ...}, then {"done": ...}
    POST /v1/chat/completions  OpenAI's chat completions, streamed (SSE chunks, then [DONE]) or not
    GET  /v1/models            the one model served
    GET  /health, GET /stats   liveness; requests served, tokens generated, queue depth, tokens/s

One worker thread owns the Engine and runs its continuous batch: HTTP handlers submit requests
to it and read their tokens back through an asyncio queue, so concurrent requests share each
forward pass. Capacity is bounded: engine rows (max_concurrency) plus max_queue waiting
requests, and Limits.max_requests_per_client in flight per client (API key, else address);
past that a request gets 429 at once, and 503 once the server is shutting down. A request
whose generation fails ends alone (an error event); the others go on.

Exposure (Security): optional API keys (Bearer, compared in constant time; 401 otherwise;
/health, the page and its files stay open), a request body limit (413), a Host allow-list
(400 for other Host headers; the CLI requires one when bound beyond loopback), CORS off unless
origins are given. Inputs are checked by pydantic (422 naming the field); undecodable JSON is
400; OpenAI parameters this server does not implement are refused with 400 naming them.
Binds 127.0.0.1 unless told otherwise.
"""


import asyncio
import hmac
import ipaddress
import json
import queue
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from nanopipe.chat import ChatFormatError, render_for_completion
from nanopipe.engine import Engine, SamplingParams, TextStream

STATIC_DIR = Path(__file__).resolve().parent / "static"
RATE_WINDOW_S = 10.0  # /stats tokens/s is measured over this much recent time


@dataclass(frozen=True)
class Limits:
    max_messages: int = 64
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_tokens: int = 2_048  # the most a request may ask for
    default_max_tokens: int = 512
    max_samples: int = 4  # OpenAI's n
    max_stop: int = 4  # OpenAI's stop: up to 4 strings
    max_stop_chars: int = 64
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_requests_per_client: int = 16  # in flight at once per API key (or address without keys)


@dataclass(frozen=True)
class Security:
    """Who may use the server. api_keys: accepted Bearer tokens (empty: no key needed).
    allowed_hosts: Host header values accepted (None: any; "*.example.com" patterns work).
    cors_origins: origins a browser page may call from (empty: CORS off)."""
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def request_models(limits: Limits, vocab_size: int):
    """The request schema, with this server's limits baked into the field constraints."""

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str = Field(max_length=limits.max_message_chars)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        # a string, or OpenAI's list of text parts (joined)
        content: Annotated[str, Field(max_length=limits.max_message_chars)] | list[TextPart]

        @field_validator("content")
        @classmethod
        def join_parts(cls, content):
            if isinstance(content, list):
                content = "".join(part.text for part in content)
                if len(content) > limits.max_message_chars:
                    raise ValueError(f"the text parts hold {len(content)} characters; the limit is "
                                     f"{limits.max_message_chars}")
            return content

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # kept to refuse by name (unsupported_parameter)
        model: str | None = None
        messages: list[Message] = Field(min_length=1, max_length=limits.max_messages)
        temperature: float = Field(default=1.0, ge=0, le=2)
        top_k: int | None = Field(default=None, ge=1, le=vocab_size)
        top_p: float | None = Field(default=None, gt=0, le=1)
        max_tokens: int | None = Field(default=None, ge=1, le=limits.max_tokens)
        max_completion_tokens: int | None = Field(default=None, ge=1, le=limits.max_tokens)
        n: int = Field(default=1, ge=1, le=limits.max_samples)
        seed: int | None = Field(default=None, ge=0, le=2**62)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None

        @field_validator("stop")
        @classmethod
        def stop_strings(cls, stop):
            stops = [stop] if isinstance(stop, str) else (stop or [])
            if len(stops) > limits.max_stop:
                raise ValueError(f"at most {limits.max_stop} stop strings, got {len(stops)}")
            if any(not s or len(s) > limits.max_stop_chars for s in stops):
                raise ValueError(f"stop strings must hold 1 to {limits.max_stop_chars} characters")
            return stops or None

        @field_validator("messages")
        @classmethod
        def total_length(cls, messages):
            total = sum(len(m.content) for m in messages)
            if total > limits.max_total_chars:
                raise ValueError(f"the messages hold {total} characters in all; the limit is {limits.max_total_chars}")
            return messages

    return ChatRequest


def unsupported_parameter(body: BaseModel) -> str | None:
    """The first field the client set that this server does not implement (null, false, 0 and
    empty values ask for nothing and pass)."""
    for name, value in (body.model_extra or {}).items():
        if value not in (None, False, 0, "", [], {}):
            return name
    return None


class StopText:
    """OpenAI's `stop` for one sample: push(text) returns the text that is safe to send (held
    back while it could be the start of a stop string) and whether a stop string was hit; the
    text ends before it, also when it spans tokens."""

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
# -----------------------------------------------------------------------------
# The worker: one thread driving the engine's continuous batch


class Overloaded(Exception):
    pass


class Unavailable(Exception):
    pass


class Stream:
    """One HTTP request's view of its engine request: the worker pushes lists of
    (sample, text, tokens, finish_reason) into `queue`, or an Exception."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: list[int], params: SamplingParams, tokenizer,
                 on_done: Callable[[], None] = lambda: None):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt = prompt
        self.params = params
        self.texts = [TextStream(tokenizer) for _ in range(params.num_samples)]
        self.request = None  # the engine's Request, set by the worker
        self.finished = False
        self.on_done = on_done  # called on the event loop once the engine is done with it

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Worker:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.capacity = engine.max_batch + max_queue  # requests in the system at once
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.outstanding = 0
        self.stopping = False
        self.streams: dict[int, Stream] = {}
        self.thread = threading.Thread(target=self._run, name="nanopipe-engine", daemon=True)
        self.started_at = time.time()
        self.requests_served = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        self.requests_cancelled = 0  # the client went away (or the server stopped) mid-generation
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tokens/s

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:  # after this, submit() refuses; what it queued before is in the inbox
            self.stopping = True
        self.inbox.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, stream: Stream) -> None:
        """Queue a request, or raise Overloaded/Unavailable at once (never block the caller)."""
        with self.lock:
            if not self.alive:
                raise Unavailable("the server is shutting down")
            if self.outstanding >= self.capacity:
                self.requests_rejected += 1
                raise Overloaded(f"the server is at capacity ({self.engine.max_batch} generating, "
                                 f"{self.max_queue} waiting); retry later")
            self.outstanding += 1
            self.inbox.put(("add", stream))

    def cancel(self, stream: Stream) -> None:
        self.inbox.put(("cancel", stream))

    def queue_depth(self) -> int:
        with self.lock:
            return max(0, self.outstanding - self.engine.active_requests)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    # --- the thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            idle = not engine.has_work()
            try:
                item = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
                while True:
                    self._handle(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.stopping:
                for stream in self.streams.values():
                    engine.cancel(stream.request)
                if not engine.has_work():
                    self._fail_all(Unavailable("the server is shutting down"))
                    return
            if not engine.has_work():
                continue
            try:
                events = engine.step()
            except Exception as e:  # report to the requests in flight, keep serving new ones
                engine.reset()
                self._fail_all(e)
                continue
            self._dispatch(events)

    def _handle(self, item) -> None:
        kind, stream = item
        if kind == "add":
            try:
                stream.request = self.engine.add_request(stream.prompt, stream.params)
            except ValueError as e:
                self._done(stream, failed=True)
                stream.push(e)
                return
            self.streams[stream.request.id] = stream
        elif kind == "cancel" and stream.request is not None and not stream.finished:
            self.engine.cancel(stream.request)

    def _dispatch(self, events) -> None:
        batches: dict[int, list] = {}
        tokens = 0
        for ev in events:
            stream = self.streams.get(ev.request_id)
            if stream is None:
                continue
            if ev.token is not None:
                tokens += 1
                text = stream.texts[ev.sample].push(ev.token)
                batches.setdefault(ev.request_id, []).append((ev.sample, text, 1, None))
            else:
                text = stream.texts[ev.sample].flush()
                batches.setdefault(ev.request_id, []).append((ev.sample, text, 0, ev.finish_reason))
        if tokens:
            now = time.monotonic()
            self.recent.append((now, tokens))
            while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
                self.recent.popleft()
        for rid, batch in batches.items():
            stream = self.streams[rid]
            if stream.request.done:
                del self.streams[rid]
                self._done(stream, failed=stream.request.error is not None)
                if "cancelled" in stream.request.finish_reasons:
                    self.requests_cancelled += 1
            stream.push(batch)

    def _done(self, stream: Stream, failed: bool) -> None:
        stream.finished = True
        stream.loop.call_soon_threadsafe(stream.on_done)
        with self.lock:
            self.outstanding -= 1
            if failed:
                self.requests_failed += 1
            else:
                self.requests_served += 1

    def _fail_all(self, error: Exception) -> None:
        for stream in list(self.streams.values()):
            self._done(stream, failed=True)
            stream.push(error)
        self.streams.clear()
        while True:  # requests not yet handed to the engine
            try:
                kind, stream = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._done(stream, failed=True)
                stream.push(error)


# -----------------------------------------------------------------------------
# What the endpoints return (the OpenAPI document is built from these)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    max_seq_len: int
    vocab_size: int
    auth_required: bool


class Capacity(BaseModel):
    generating: int
    waiting: int


class Stats(BaseModel):
    model: str
    uptime_s: float
    requests_served: int
    requests_failed: int
    requests_rejected: int
    requests_cancelled: int
    tokens_generated: int
    active_requests: int
    queue_depth: int
    tokens_per_s: float
    capacity: Capacity


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


SSE_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}}}
ERROR_DOCS = {
    400: {"model": ErrorResponse, "description": "Undecodable JSON, an unsupported parameter, a conversation "
                                                 "longer than the context, or a Host not on the allow-list"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Request body over the limit"},
    422: {"model": ErrorResponse, "description": "A field fails validation (named in error.param)"},
    429: {"model": ErrorResponse, "description": "At capacity, or this client has too many requests in flight"},
    500: {"model": ErrorResponse, "description": "Generation failed for this request"},
    503: {"model": ErrorResponse, "description": "Shutting down"},
}
OPEN_PATHS = ("/health", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def _json_response(status: int, message: str, kind: str, param: str | None = None, headers=None):
    return JSONResponse(status_code=status, content=_error_body(message, kind, param), headers=headers)


class APIKeys:
    """ASGI middleware: every path but the open ones needs `Authorization: Bearer <key>` with one
    of `keys` (each compared in constant time)."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and not (
                path in OPEN_PATHS or path.startswith("/static/")):
            token = bearer_token(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")).encode()
            matched = False
            for key in self.keys:  # no early exit: the time taken does not say which key was close
                matched |= hmac.compare_digest(token, key)
            if not matched:
                response = _json_response(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                                          "authentication_error", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def bearer_token(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class BodyLimit:
    """ASGI middleware: request bodies over max_bytes get 413, by Content-Length before reading
    and by counting while reading (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _json_response(413, f"the request body is over the limit of {self.max_bytes} bytes",
                                   "invalid_request_error")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class BodyTooLarge(HTTPException):  # an HTTPException, so FastAPI's body parsing lets it through
    def __init__(self):
        super().__init__(413, "the request body is over the limit")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# The app


def create_app(engine: Engine, model_name: str = "nanopipe", limits: Limits | None = None,
               max_queue: int = 64, security: Security | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (its tokenizer renders the chats). model_name is shown on
    the page and in /v1/models. The worker thread starts and stops with the app's lifespan."""
    limits = limits or Limits()
    security = security or Security()
    tokenizer = engine.tokenizer
    ChatRequest = request_models(limits, engine.vocab_size)
    worker = Worker(engine, max_queue)
    in_flight: dict[str, int] = {}  # client -> requests in flight (touched on the event loop only)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="nanopipe", lifespan=lifespan,
                  description="A nanopipe chat model: the web page's streaming endpoint and an OpenAI-compatible API.")
    app.state.worker = worker
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # the last added runs first: Host check, CORS (answers preflights), API key, body limit
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if security.api_keys:
        app.add_middleware(APIKeys, keys=tuple(security.api_keys))
    if security.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if security.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(security.allowed_hosts))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems, param = [], None
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _json_response(400, "the body is not valid JSON", "invalid_request_error", "body")
        for err in errors:
            # pydantic names the branch of a union in loc ("constrained-str", "list[TextPart]"): not a field
            loc = [str(x) for x in err.get("loc", ()) if x != "body" and not (isinstance(x, str) and set(x) & set("-["))]
            field = ".".join(loc) or "body"
            param = param or field
            problems.append(f"{field}: {err.get('msg')}")
        return _json_response(422, "; ".join(problems), "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc, BodyTooLarge):
            return _json_response(413, f"the request body is over the limit of {limits.max_body_bytes} bytes",
                                  "invalid_request_error")
        return _json_response(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _json_response(exc.status, exc.message, exc.kind, exc.param)

    def client_of(request: Request) -> str:
        if security.api_keys:  # one key, one client (the key was checked by APIKeys)
            return "key:" + bearer_token(request.headers.get("authorization", ""))
        return "addr:" + (request.client.host if request.client else "?")

    def start(body, request: Request) -> Stream:
        extra = unsupported_parameter(body)
        if extra is not None:
            raise APIError(400, f"unsupported parameter {extra!r}: this server does not implement it",
                           "invalid_request_error", extra)
        try:
            prompt = render_for_completion(tokenizer, {"messages": [m.model_dump() for m in body.messages]})
        except ChatFormatError as e:
            raise APIError(422, f"messages: {e}", "invalid_request_error", "messages") from None
        if len(prompt) >= engine.max_seq_len:
            raise APIError(400, f"messages: the conversation is {len(prompt)} tokens; this model's context "
                           f"holds {engine.max_seq_len}", "context_length_exceeded", "messages")
        client = client_of(request)
        if in_flight.get(client, 0) >= limits.max_requests_per_client:
            raise APIError(429, f"this client already has {limits.max_requests_per_client} requests in flight; "
                           "retry when one ends", "rate_limit_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, seed=body.seed, num_samples=body.n)

        def release():
            in_flight[client] -= 1
            if not in_flight[client]:
                del in_flight[client]

        stream = Stream(asyncio.get_running_loop(), prompt, params, tokenizer, on_done=release)
        try:
            worker.submit(stream)
        except Overloaded as e:
            raise APIError(429, str(e), "rate_limit_exceeded") from None
        except Unavailable as e:
            raise APIError(503, str(e), "service_unavailable") from None
        in_flight[client] = in_flight.get(client, 0) + 1
        return stream

    async def batches(stream: Stream, stop: list[str] | None):
        """The stream's updates as they come (merged when several are waiting), as lists of
        (sample, text, tokens, finish_reason): stop strings applied (the text ends before one,
        finish_reason "stop"), a failed generation raised. Cancels the engine request once every
        sample has ended by a stop string, or if the consumer stops early (client gone)."""
        stops = [StopText(stop) for _ in range(stream.params.num_samples)]
        open_samples = set(range(stream.params.num_samples))
        try:
            while open_samples:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                merged = []
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                    for s, text, k, reason in item:
                        if s not in open_samples:
                            continue
                        if reason == "error":
                            raise GenerationFailed(stream.request.error or "generation failed")
                        text = stops[s].push(text) + (stops[s].flush() if reason is not None else "")
                        if stops[s].stopped:
                            reason = "stop"
                        if reason is not None:
                            open_samples.discard(s)
                        merged.append((s, text, k, reason))
                yield merged
        finally:
            if not stream.finished:
                worker.cancel(stream)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def error_event(e: Exception) -> dict:
        return _error_body(f"generation failed: {type(e).__name__}: {e}", "server_error")

    # --- the page and its endpoint

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    # response_class Response: the 200 is documented as text/event-stream only, errors as JSON
    @app.post("/chat/completions", response_class=Response, responses={**ERROR_DOCS, 200: {
        "content": SSE_DOC, "description": 'Server-sent events: {"text": ...} pieces, then {"done": true, '
                                           '"finish_reason": ..., "usage": ...} or {"error": ...}'}})
    async def chat_completions(body: ChatRequest, request: Request):
        """The web page's endpoint: the reply to the conversation, streamed."""
        stream = start(body, request)

        async def events():
            completion = 0
            try:
                async for merged in batches(stream, body.stop):
                    text = "".join(t for s, t, _, _ in merged if s == 0)
                    completion += sum(k for *_, k, _ in merged)
                    if text:
                        yield sse({"text": text})
                    for s, _, _, reason in merged:
                        if reason is not None and s == 0:
                            yield sse({"done": True, "finish_reason": reason,
                                       "usage": {"prompt_tokens": len(stream.prompt), "completion_tokens": completion}})
            except Exception as e:
                yield sse(error_event(e))

        return EventStream(events(), headers={"Cache-Control": "no-cache"})

    # --- OpenAI-compatible API

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_DOCS[401]})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(worker.started_at),
                                            "owned_by": "nanopipe"}]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_DOCS, 200: {
        "content": SSE_DOC, "description": "A chat.completion, or with stream=true server-sent chat.completion.chunk "
                                           "events then [DONE]"}})
    async def openai_chat_completions(body: ChatRequest, request: Request):
        """OpenAI's chat completions: n samples, temperature/top_p (and top_k), seed, max_tokens,
        stop (up to 4 strings), streaming with optional usage."""
        stream = start(body, request)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        name = model_name
        n = body.n

        def chunk(choices, usage=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return sse(obj)

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events():
                completion = 0
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(n)])
                try:
                    async for merged in batches(stream, body.stop):
                        texts: dict[int, str] = {}
                        finished = []
                        for s, text, k, reason in merged:
                            completion += k
                            if text:
                                texts[s] = texts.get(s, "") + text
                            if reason is not None:
                                finished.append((s, reason))
                        if texts:
                            yield chunk([{"index": s, "delta": {"content": t}, "finish_reason": None}
                                         for s, t in sorted(texts.items())])
                        if finished:
                            yield chunk([{"index": s, "delta": {}, "finish_reason": _openai_reason(r)}
                                         for s, r in finished])
                    if include_usage:
                        yield chunk([], usage=_usage(len(stream.prompt), completion))
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    yield sse(error_event(e))

            return EventStream(events(), headers={"Cache-Control": "no-cache"})

        texts = [""] * n
        reasons: list[str | None] = [None] * n
        completion = 0
        try:
            async for merged in batches(stream, body.stop):
                for s, text, k, reason in merged:
                    texts[s] += text
                    completion += k
                    if reason is not None:
                        reasons[s] = reason
        except Exception as e:
            raise APIError(500, error_event(e)["error"]["message"], "server_error") from None
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "finish_reason": _openai_reason(reasons[i]), "logprobs": None} for i in range(n)],
                "usage": _usage(len(stream.prompt), completion)}

    # --- operations

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Shutting down"}})
    async def health():
        """Liveness (no API key needed); auth_required tells the page to ask for a key."""
        body = {"status": "ok" if worker.alive else "unavailable", "model": model_name,
                "max_seq_len": engine.max_seq_len, "vocab_size": engine.vocab_size,
                "auth_required": bool(security.api_keys)}
        return JSONResponse(status_code=200 if worker.alive else 503, content=body)

    @app.get("/stats", response_model=Stats, responses={401: ERROR_DOCS[401]})
    async def stats():
        return {"model": model_name, "uptime_s": round(time.time() - worker.started_at, 1),
                "requests_served": worker.requests_served, "requests_failed": worker.requests_failed,
                "requests_rejected": worker.requests_rejected, "requests_cancelled": worker.requests_cancelled,
                "tokens_generated": engine.tokens_generated,
                "active_requests": engine.active_requests, "queue_depth": worker.queue_depth(),
                "tokens_per_s": round(worker.tokens_per_s(), 1),
                "capacity": {"generating": engine.max_batch, "waiting": worker.max_queue}}

    return app


class GenerationFailed(Exception):
    pass


def _openai_reason(reason: str | None) -> str | None:
    # OpenAI's vocabulary: "stop" | "length"; a cancelled generation was cut short, like "length"
    return {"stop": "stop", "length": "length", "cancelled": "length"}.get(reason, reason)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def check_exposure(host: str, tools: bool, allow_unsandboxed_tools: bool, allowed_hosts: tuple[str, ...] | None,
                   api_keys: tuple[str, ...]) -> list[str]:
    """Refuse (SystemExit naming the flag) what would be unsafe beyond loopback; the warnings to print."""
    from nanopipe.sandbox import isolation

    warnings = []
    if tools and not isolation().available:
        if not is_loopback(host) and not allow_unsandboxed_tools:
            raise SystemExit(f"nanopipe serve: refusing to serve tools on {host}: model-written code would run "
                             f"without OS isolation ({'; '.join(isolation().missing)}). Install bubblewrap, serve on "
                             "127.0.0.1, pass --no-tools, or pass --allow-unsandboxed-tools to accept the risk.")
        warnings.append("tool calls run WITHOUT OS isolation (see the sandbox warning above)")
    if not is_loopback(host):
        if allowed_hosts is None and host in ("0.0.0.0", "::", ""):
            raise SystemExit(f"nanopipe serve: bound to {host or 'every address'}, so name the host names clients "
                             "use with --allowed-host (repeatable; '*' accepts any, which allows DNS rebinding)")
        if not api_keys:
            warnings.append(f"serving on {host} without an API key: anyone who can reach it can use it "
                            "(--api-key or NANOPIPE_API_KEY)")
    return warnings


def serve_main(store_url: str | None, model: str | None, host: str = "127.0.0.1", port: int = 8000,
               device: str = "auto", max_concurrency: int = 16, max_queue: int = 64, api_keys: tuple[str, ...] = (),
               allowed_hosts: tuple[str, ...] | None = None, cors_origins: tuple[str, ...] = (),
               max_body_bytes: int = Limits.max_body_bytes, max_per_client: int = Limits.max_requests_per_client,
               tools: bool = True, allow_unsandboxed_tools: bool = False) -> None:
    """`nanopipe serve`: load a checkpoint from the store and serve it with uvicorn until Ctrl-C.
    max_concurrency: sequences decoded together (engine rows); max_queue: requests that may wait.
    device: auto (CUDA when present), cpu or cuda; the engine runs it as nanopipe.device says (CUDA:
    bf16 autocast, TF32, a bf16 KV cache). Beyond loopback: a Host allow-list (the bound address itself unless told), and tools only
    with OS isolation (or allow_unsandboxed_tools)."""
    import uvicorn

    from nanopipe.engine import load_engine

    if allowed_hosts is None and not is_loopback(host) and host not in ("0.0.0.0", "::", ""):
        allowed_hosts = (host,)
    for line in check_exposure(host, tools, allow_unsandboxed_tools, allowed_hosts, api_keys):
        print(f"WARNING: {line}", flush=True)
    engine, name = load_engine(store_url, model, device=device, max_batch=max_concurrency, tools=tools)
    limits = Limits(max_body_bytes=max_body_bytes, max_requests_per_client=max_per_client)
    app = create_app(engine, model_name=name, max_queue=max_queue, limits=limits,
                     security=Security(api_keys=api_keys, allowed_hosts=allowed_hosts, cors_origins=cors_origins))
    print(f"serving {name} on http://{host}:{port} (OpenAI API at http://{host}:{port}/v1; "
          f"{engine.device}, {str(engine.dtype).removeprefix('torch.')})"
          + (" — API key required" if api_keys else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
