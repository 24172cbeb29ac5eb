"""Serving: the OpenAI-compatible API (through the official client), the web page (headless
Chromium), limits and overload behaviour, and the terminal chat."""

import asyncio
import contextlib
import io
import json
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from nanopipe import sandbox
from nanopipe.engine import Engine
from nanopipe.serve.app import Limits, Security, StopText, check_exposure, create_app
from nanopipe.serve.chat_cli import assistant_content, chat_main, repl
from nanopipe.train.common import save_model
from test_engine import random_model, train_tokenizer

MODEL_NAME = "sft/0123456789ab"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """The app under uvicorn on 127.0.0.1 (a free port) in a background thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def make_app(tok, model, max_batch=4, max_queue=8, security=None, engine_class=Engine, **limits):
    return create_app(engine_class(model, tok, max_batch=max_batch), model_name=MODEL_NAME, max_queue=max_queue,
                      limits=Limits(**limits), security=security)


@pytest.fixture(scope="module")
def server(tok, model):
    with live_server(make_app(tok, model, default_max_tokens=40)) as url:
        yield url


def chat(content: str = "hello", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], **kw}


# --- OpenAI compatibility


def test_official_openai_client_streaming_and_not(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    done = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert done.object == "chat.completion" and done.model == MODEL_NAME
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content  # greedy: the same answer, streamed
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    # n samples, seeded: reproducible; top_k is passed as an extra field
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=1.0, n=3, seed=5,
              extra_body={"top_k": 20})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(a.choices) == 3
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


# --- the web page


class SlowEngine(Engine):
    """A model slow enough (10 ms a token) for a browser to see the reply arrive in pieces."""

    def step(self):
        time.sleep(0.01)
        return super().step()


@pytest.mark.parametrize("api_key", [None, "page-key-123"])
def test_page_streams_a_reply_in_headless_chromium(tok, model, api_key):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install the Debian package `chromium`")
    security = Security(api_keys=(api_key,)) if api_key else None
    app = create_app(SlowEngine(model, tok, max_batch=2), model_name=MODEL_NAME, limits=Limits(default_max_tokens=30),
                     security=security)
    with live_server(app) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            if api_key:
                # without the key the page says what is missing and shows the key field
                page.goto(server + "/")
                page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(MODEL_NAME)}")
                assert page.is_visible("#api-key")
                page.fill("#input", "hello")
                page.press("#input", "Enter")
                page.wait_for_selector(".message.assistant.error", timeout=30_000)
                assert "API key" in page.inner_text(".message.assistant.error")
                page.click("#new-chat")
                page.goto(server + "/#key=" + api_key)  # the key from the URL fragment, then out of the address bar
                page.wait_for_function("!window.location.hash")
            else:
                page.goto(server + "/")
            page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(MODEL_NAME)}")
            # record the reply's text each time it changes, to see it arrive in pieces
            page.evaluate("""() => {
                window.replyStates = [];
                new MutationObserver(() => {
                    const r = document.querySelector('.message.assistant');
                    if (r) window.replyStates.push(r.textContent);
                }).observe(document.getElementById('conversation'),
                           {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#temperature", "0")
            page.fill("#input", "Tell me a story.")
            page.press("#input", "Enter")
            page.wait_for_selector(".message.assistant:not(.streaming)", timeout=30_000)
            reply = page.inner_text(".message.assistant")
            assert reply.strip() and "error" not in page.get_attribute(".message.assistant", "class")
            states = [s for s in page.evaluate("window.replyStates") if s]
            assert len(set(states)) >= 2, "the reply arrived in one piece, not streamed"
            assert page.inner_text(".message.user") == "Tell me a story."

            page.click("#new-chat")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()


# --- limits, overload, lifecycle


@pytest.mark.parametrize("body, field", [
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(top_k=0), "top_k"),
    (chat(top_k=10**6), "top_k"),
    (chat(top_p=1.5), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=10**6), "max_tokens"),
    (chat(n=99), "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
    (chat("x" * 8_001), "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * 7_000}, {"role": "assistant", "content": "y" * 7_000}] * 3},
     "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"temperature": 1}, "messages"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_malformed_requests_get_422_naming_the_field(server, body, field, path):
    r = httpx.post(server + path, json=body, timeout=10)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and field.split(".")[-1] in error["message"]


def test_body_that_is_not_json_gets_400(server):
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"] and r.json()["error"]["param"] == "body"


def test_conversation_longer_than_the_context_gets_400(server):
    r = httpx.post(server + "/v1/chat/completions", json=chat("word " * 1000), timeout=10)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, list[str]]:
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            assert "error" in r.json()
            return r.status_code, []
        return 200, [line async for line in r.aiter_lines() if line.startswith("data: ")]


def test_32_concurrent_streams_finish_or_are_refused_and_health_answers(tok, model):
    max_batch, max_queue = 4, 8
    with live_server(make_app(tok, model, max_batch=max_batch, max_queue=max_queue)) as url:
        async def load():
            async with httpx.AsyncClient(timeout=httpx.Timeout(60)) as client:
                body = chat(max_tokens=24, temperature=0.8, stream=True)
                streams = [asyncio.create_task(_stream(client, url + "/v1/chat/completions", body))
                           for _ in range(32)]
                await asyncio.sleep(0.05)
                t0 = time.monotonic()
                health = await client.get(url + "/health", timeout=5)
                health_s = time.monotonic() - t0
                results = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
                return results, health, health_s

        results, health, health_s = asyncio.run(load())
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429, 503}
        assert statuses.count(200) >= max_batch + max_queue  # the first arrivals all fit
        for status, lines in results:
            if status == 200:
                assert lines[-1] == "data: [DONE]"
                assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert health.status_code == 200 and health_s < 5
        stats = httpx.get(url + "/stats", timeout=10).json()
        assert stats["requests_served"] == statuses.count(200)
        assert stats["requests_rejected"] == statuses.count(429)
        assert stats["queue_depth"] == 0 and stats["active_requests"] == 0
        assert stats["tokens_generated"] > 0


def test_full_server_answers_429_at_once_and_frees_a_slot_on_disconnect(tok, model):
    app = create_app(SlowEngine(model, tok, max_batch=1), model_name=MODEL_NAME, max_queue=0)
    with live_server(app) as url:
        with httpx.Client(timeout=30) as client:
            body = chat(max_tokens=2_000, stream=True)
            with client.stream("POST", url + "/v1/chat/completions", json=body) as first:
                assert first.status_code == 200
                for line in first.iter_lines():  # until a token arrives: generating now
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
                t0 = time.monotonic()
                refused = client.post(url + "/v1/chat/completions", json=chat(max_tokens=5))
                assert refused.status_code == 429 and time.monotonic() - t0 < 5
                assert "capacity" in refused.json()["error"]["message"]
            # the client went away: its generation is cancelled and the slot comes back
            deadline = time.monotonic() + 20
            while not client.get(url + "/stats").json()["requests_cancelled"] and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = client.get(url + "/stats").json()
            assert stats["requests_cancelled"] == 1 and stats["active_requests"] == 0
            assert stats["tokens_generated"] < 100  # stopped early: the reply could run to ~120 tokens
            again = client.post(url + "/v1/chat/completions", json=chat(max_tokens=5))
            assert again.status_code == 200


def test_shutting_down_answers_503(tok, model):
    from fastapi.testclient import TestClient

    app = make_app(tok, model)
    with TestClient(app) as client:
        assert client.post("/chat/completions", json=chat(max_tokens=3)).status_code == 200
        app.state.worker.stop()
        r = client.post("/v1/chat/completions", json=chat(max_tokens=3))
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503


def test_page_endpoint_stream_format_and_stats(server):
    before = httpx.get(server + "/stats", timeout=10).json()
    with httpx.stream("POST", server + "/chat/completions", json=chat(max_tokens=6, temperature=0), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert all("text" in e for e in events[:-1])
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] <= 6
    after = httpx.get(server + "/stats", timeout=10).json()
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] >= before["tokens_generated"] + events[-1]["usage"]["completion_tokens"]
    assert httpx.get(server + "/", timeout=10).text.startswith("<!doctype html>")


# --- the terminal chat


def test_chat_repl_keeps_history_and_starts_over(tok, model):
    engine = Engine(model, tok, max_batch=1)
    lines = iter(["hello", "and again", "/new", "/bogus", "fresh start", "/quit"])
    prompts = []
    real_generate = engine.generate

    def spy(prompt, **kw):
        prompts.append(prompt)
        return real_generate(prompt, **kw)

    engine.generate = spy
    out = io.StringIO()
    repl(engine, MODEL_NAME, temperature=0.0, top_k=None, max_tokens=8, read=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert MODEL_NAME in text and "(new conversation)" in text and "unknown command '/bogus'" in text
    assert text.count("assistant> ") == 3
    decoded = [tok.decode(p) for p in prompts]
    assert "hello" in decoded[1] and "and again" in decoded[1]  # history carried over
    assert "hello" not in decoded[2] and "fresh start" in decoded[2]  # /new forgot it


def test_assistant_content_keeps_tool_calls_as_parts(tok):
    sid = tok.id_of
    tokens = (tok.encode("Let me add.") + [sid("<|python_start|>")] + tok.encode("1+2") + [sid("<|python_end|>")]
              + [sid("<|output_start|>")] + tok.encode("3") + [sid("<|output_end|>")] + tok.encode(" It is 3."))
    assert assistant_content(tok, tokens) == [
        {"type": "text", "text": "Let me add."}, {"type": "python", "text": "1+2"},
        {"type": "python_output", "text": "3"}, {"type": "text", "text": " It is 3."}]
    assert assistant_content(tok, tok.encode("plain")) == "plain"


def test_chat_main_one_shot_from_a_store_checkpoint(tmp_path, tok, model, capsys):
    from nanopipe.store import Store

    store = Store(str(tmp_path / "store"))
    w = store.writer("tokenizer", "a" * 64)
    for name, data in tok.to_files().items():
        w.write_bytes(name, data)
    tok_manifest = w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())
    w = store.writer("sft", "b" * 64)
    save_model(w, model)
    w.commit(config={}, upstream={"tokenizer": tok_manifest}, code_version="test", metrics={}, started_at=time.time())

    chat_main(str(tmp_path / "store"), None, "hello", temperature=0.0, top_k=None, max_tokens=10, device="cpu")
    printed = capsys.readouterr().out
    engine = Engine(model, tok)
    expected = engine.generate_batch(engine_prompt(tok, "hello"), max_tokens=10, temperature=0)[0][0]
    assert printed.rstrip("\n") == tok.decode(expected[len(engine_prompt(tok, "hello")):])


def engine_prompt(tok, text: str) -> list[int]:
    from nanopipe.chat import render_for_completion

    return render_for_completion(tok, {"messages": [{"role": "user", "content": text}]})



# --- a server you can put on a network


def test_api_keys_are_required_except_for_health_and_the_page(tok, model):
    from fastapi.testclient import TestClient

    app = make_app(tok, model, security=Security(api_keys=("k-one", "k-two")), default_max_tokens=3)
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-one"},
                        {"Authorization": "Basic k-one"}, {"Authorization": "Bearer k-one-and-more"}):
            r = client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["type"] == "authentication_error"
        assert client.get("/stats").status_code == 401 and client.get("/v1/models").status_code == 401
        for key in ("k-one", "k-two"):
            r = client.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert client.get("/health").json()["auth_required"] is True
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200


def test_body_over_the_limit_gets_413_by_length_and_by_counting(server):
    big = json.dumps(chat("x" * 2_000_000)).encode()
    r = httpx.post(server + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: chunked upload, counted while read
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(server + "/chat/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=10)
    assert r.status_code == 413


def test_host_allow_list_and_cors(tok, model):
    from fastapi.testclient import TestClient

    app = make_app(tok, model, security=Security(allowed_hosts=("chat.example.org",),
                                                 cors_origins=("https://app.example.org",)))
    with TestClient(app, base_url="http://chat.example.org") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "evil.example.com"}).status_code == 400
        ok = client.get("/v1/models", headers={"Origin": "https://app.example.org"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example.org"
        other = client.get("/v1/models", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(make_app(tok, model)) as client:  # default: CORS off
        r = client.options("/v1/chat/completions", headers={"Origin": "https://app.example.org",
                                                            "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_per_client_concurrency_limit(tok, model):
    app = create_app(SlowEngine(model, tok, max_batch=4), model_name=MODEL_NAME, max_queue=8,
                     limits=Limits(max_requests_per_client=1), security=Security(api_keys=("a", "b")))
    with live_server(app) as url, httpx.Client(timeout=30) as client:
        body = chat(max_tokens=400, stream=True)
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer a"}) as first:
            assert first.status_code == 200
            second = client.post(url + "/v1/chat/completions", json=chat(max_tokens=2), headers={"Authorization": "Bearer a"})
            assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
            other = client.post(url + "/v1/chat/completions", json=chat(max_tokens=2), headers={"Authorization": "Bearer b"})
            assert other.status_code == 200  # another client is not held back
        deadline = time.monotonic() + 20  # the first ended (client gone): its slot comes back
        while time.monotonic() < deadline:
            again = client.post(url + "/v1/chat/completions", json=chat(max_tokens=2), headers={"Authorization": "Bearer a"})
            if again.status_code == 200:
                break
            time.sleep(0.1)
        assert again.status_code == 200


def test_stop_strings_cut_the_text_also_across_tokens_and_when_streaming(server):
    base = httpx.post(server + "/v1/chat/completions", json=chat("Tell me a story.", max_tokens=30, temperature=0),
                      timeout=30).json()["choices"][0]["message"]["content"]
    assert len(base) > 8
    stop = base[3:7]  # four characters from inside the reply: usually more than one token
    cut = base[:base.index(stop)]
    body = chat("Tell me a story.", max_tokens=30, temperature=0, stop=[stop, "\u2603never"])
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=30).json()
    assert r["choices"][0]["message"]["content"] == cut and r["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == cut
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    with httpx.stream("POST", server + "/chat/completions", json={**body, "stop": stop}, timeout=30) as s:
        page = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in page) == cut and page[-1]["finish_reason"] == "stop"
    for bad in (["a"] * 5, [""], "x" * 65):
        assert httpx.post(server + "/v1/chat/completions", json=chat(stop=bad), timeout=10).status_code == 422


def test_stop_text_holds_back_possible_starts():
    st = StopText(["END", "xyz"])
    assert st.push("abcE") == "abc" and st.push("N") == "" and st.push("q") == "ENq"
    assert st.push("..EN") == ".." and st.push("D and more") == "" and st.stopped and st.push("zzz") == ""
    assert StopText(None).push("anything") == "anything"


def test_content_as_a_list_of_text_parts(server):
    plain = httpx.post(server + "/v1/chat/completions", json=chat("Hello there", max_tokens=6, temperature=0),
                       timeout=30).json()
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                       {"type": "text", "text": " there"}]}],
             "max_tokens": 6, "temperature": 0}
    r = httpx.post(server + "/v1/chat/completions", json=parts, timeout=30)
    assert r.status_code == 200 and r.json()["choices"] == plain["choices"]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    r = httpx.post(server + "/v1/chat/completions", json=image, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages.0.content")


@pytest.mark.parametrize("field, value", [("logprobs", True), ("tools", [{"type": "function"}]),
                                          ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
                                          ("logit_bias", {"1": 5}), ("frobnicate", 1)])
def test_unimplemented_parameters_get_400_naming_them(server, field, value):
    r = httpx.post(server + "/v1/chat/completions", json=chat(**{field: value}), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_parameters_that_ask_for_nothing_pass(server):
    r = httpx.post(server + "/v1/chat/completions", timeout=30,
                   json=chat(max_tokens=2, logprobs=False, presence_penalty=0, tools=[], user=None))
    assert r.status_code == 200, r.text


class PoisonedEngine(Engine):
    """Requests with temperature 0.123 get NaN logits after 2 tokens (a model fault in one row)."""

    def _decode(self):
        logits = super()._decode()
        for i, row in enumerate(self.rows):
            if row.request.params.temperature == 0.123 and row.generated >= 2:
                logits[i] = float("nan")
        return logits


def test_one_poisoned_request_among_12_streams_fails_alone(tok, model):
    with live_server(make_app(tok, model, max_batch=12, engine_class=PoisonedEngine)) as url:
        async def load():
            async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
                bodies = [chat(max_tokens=20, temperature=0.8, seed=i, stream=True) for i in range(12)]
                bodies[4]["temperature"] = 0.123
                bodies[7]["temperature"] = 1e-200  # too small to divide by: greedy, not an error
                return await asyncio.gather(*(_stream(client, url + "/v1/chat/completions", b) for b in bodies))

        results = asyncio.run(load())
        assert [status for status, _ in results] == [200] * 12
        for i, (_, lines) in enumerate(results):
            if i == 4:
                assert "non-finite logits" in json.loads(lines[-1][6:])["error"]["message"]
            else:
                assert lines[-1] == "data: [DONE]", (i, lines[-2:])
        r = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=10, temperature=0.123), timeout=30)
        assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
        stats = httpx.get(url + "/stats", timeout=10).json()
        assert stats["requests_failed"] == 2 and stats["requests_served"] == 11 and stats["active_requests"] == 0


def test_exposure_rules(monkeypatch):
    isolated = sandbox.Isolation("/usr/bin/bwrap", True, ())
    missing = sandbox.Isolation(None, False, ("bubblewrap (Debian package `bubblewrap`)",))
    monkeypatch.setattr(sandbox, "isolation", lambda: missing)
    with pytest.raises(SystemExit, match="allow-unsandboxed-tools"):
        check_exposure("192.0.2.1", tools=True, allow_unsandboxed_tools=False, allowed_hosts=("x",), api_keys=("k",))
    assert check_exposure("192.0.2.1", tools=False, allow_unsandboxed_tools=False, allowed_hosts=("x",),
                          api_keys=("k",)) == []
    warned = check_exposure("192.0.2.1", tools=True, allow_unsandboxed_tools=True, allowed_hosts=("x",), api_keys=())
    assert any("WITHOUT OS isolation" in w for w in warned) and any("API key" in w for w in warned)
    assert check_exposure("127.0.0.1", tools=True, allow_unsandboxed_tools=False, allowed_hosts=None, api_keys=())
    monkeypatch.setattr(sandbox, "isolation", lambda: isolated)
    with pytest.raises(SystemExit, match="--allowed-host"):
        check_exposure("0.0.0.0", tools=True, allow_unsandboxed_tools=False, allowed_hosts=None, api_keys=("k",))
    assert check_exposure("0.0.0.0", tools=True, allow_unsandboxed_tools=False, allowed_hosts=("a.b",),
                          api_keys=("k",)) == []


def test_serve_cli_flags_and_env_key_reach_the_server(monkeypatch, tmp_path):
    import nanopipe.serve.app as app_module
    from nanopipe import cli

    seen = {}
    monkeypatch.setattr(app_module, "serve_main", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    monkeypatch.setenv("NANOPIPE_API_KEY", "env-key,second-key")
    cli.main(["serve", "--store", str(tmp_path), "--host", "0.0.0.0", "--allowed-host", "chat.example.org",
              "--api-key", "flag-key", "--cors-origin", "https://app.example.org", "--max-body-bytes", "1000",
              "--max-per-client", "2", "--no-tools"])
    kw = seen["kwargs"]
    assert kw["api_keys"] == ("flag-key", "env-key", "second-key")
    assert kw["allowed_hosts"] == ("chat.example.org",) and kw["cors_origins"] == ("https://app.example.org",)
    assert (kw["max_body_bytes"], kw["max_per_client"], kw["tools"], kw["allow_unsandboxed_tools"]) == (1000, 2, False, False)
