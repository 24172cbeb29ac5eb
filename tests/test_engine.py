"""Inference engine: KV cache vs full recompute, continuous batching, sampling, tool use."""

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from nanopipe import engine as engine_mod
from nanopipe.engine import Engine, KVCache, TextStream, generate_without_cache, sampling_probs
from nanopipe.model import GPT, GPTConfig
from nanopipe.tokenizer import Tokenizer

VOCAB = 512


def train_tokenizer() -> Tokenizer:
    """A small BPE trained in a blink on Python's own stdlib sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:20]]
    if importlib.util.find_spec("nanopipe_bpe") is None:  # not built: PyPI rustbpe has the same API
        rustbpe = pytest.importorskip("rustbpe")
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "nanopipe_bpe", rustbpe)
            return Tokenizer.train(texts, VOCAB)
    return Tokenizer.train(texts, VOCAB)


def random_model(sequence_len: int = 128, seed: int = 0) -> GPT:
    """A GPT with every weight random. nanochat's init zeroes the output projections, which
    would make attention irrelevant (a bigram model): useless for checking a KV cache."""
    config = GPTConfig(sequence_len=sequence_len, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 1.0))
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_model()


def prompts(tok: Tokenizer) -> list[list[int]]:
    texts = ["def foo(x):", "import os\nimport sys\n\nclass Path", "return", "for i in range(10):\n    print(i) # loop"]
    return [tok.encode(t, prepend="<|bos|>") for t in texts]


def test_kv_cache_greedy_matches_full_recompute(tok, model):
    engine = Engine(model, tok, max_batch=4)
    for prompt in prompts(tok):
        expected = generate_without_cache(model, prompt, 40, engine.stop_ids)
        results, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0)
        assert results[0][len(prompt):] == expected
        assert masks[0] == [0] * len(prompt) + [1] * len(expected)
    assert not engine.rows and not engine.waiting


def test_kv_cache_grows_past_its_first_capacity(tok):
    model = random_model(sequence_len=512, seed=1)
    engine = Engine(model, tok, max_batch=2)
    assert engine.cache.capacity == 256
    prompt = tok.encode("x = 1\n" * 60, prepend="<|bos|>")[:230]
    (request,) = engine.generate_many([prompt], max_tokens=60, temperature=0)
    assert engine.cache.capacity >= len(prompt) + 59
    assert request.tokens[0] == generate_without_cache(model, prompt, 60, engine.stop_ids)


def test_batched_decoding_equals_separate_runs(tok, model):
    engine = Engine(model, tok, max_batch=8)
    ps = prompts(tok)
    assert len({len(p) for p in ps}) == 4
    separate = [engine.generate_batch(p, max_tokens=30, temperature=0)[0][0][len(p):] for p in ps]
    together = engine.generate_many(ps, max_tokens=30, temperature=0)
    assert [r.tokens[0] for r in together] == separate
    # two samples each: prompts prefill into rows 0, 2, 4, 6 and are copied to 1, 3, 5, 7
    pairs = engine.generate_many(ps, max_tokens=30, temperature=0, num_samples=2)
    assert [r.tokens for r in pairs] == [[s, s] for s in separate]


def test_continuous_batching_rows_join_and_leave(tok, model):
    """Requests join mid-flight (different positions in one batch) and leave at different
    times (rows move to fill holes); each still gets exactly its standalone tokens."""
    engine = Engine(model, tok, max_batch=3)
    engine.stop_ids = frozenset()  # every request runs to its budget, leaving at a known step
    ps = prompts(tok)
    budgets = [25, 8, 30, 12]
    separate = [generate_without_cache(model, p, n, engine.stop_ids) for p, n in zip(ps, budgets)]
    first = [engine.add_request(ps[i], max_tokens=budgets[i], temperature=0) for i in (0, 1)]
    for _ in range(5):
        engine.step()
    later = [engine.add_request(ps[i], max_tokens=budgets[i], temperature=0) for i in (2, 3)]
    batch_sizes = []
    while engine.has_work():
        engine.step()
        batch_sizes.append(len(engine.rows))
    assert max(batch_sizes) == 3  # the fourth request waited for a free row
    assert [r.tokens[0] for r in first + later] == separate
    assert [r.finish_reasons[0] for r in first + later] == ["length"] * 4


def test_samples_share_one_prefill_and_are_reproducible(tok, model, monkeypatch):
    engine = Engine(model, tok, max_batch=8)
    prompt = prompts(tok)[1]
    prefills = []
    real_prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda ps, slots: prefills.append(len(ps)) or real_prefill(ps, slots))

    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    assert prefills == [1]  # one prompt row for four samples
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # the samples differ from each other

    # the same seed gives the same samples while other requests share the batch
    other = engine.add_request(prompts(tok)[0], max_tokens=15, temperature=1.0, seed=1)
    (d,) = engine.generate_many([prompt], num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    assert [prompt + t for t in d.tokens] == a
    assert other.done

    # greedy samples from the copied cache rows all equal the single greedy run
    greedy, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0)
    expected = generate_without_cache(model, prompt, 20, engine.stop_ids)
    assert all(r[len(prompt):] == expected for r in greedy)


def test_engine_follows_weight_updates(tok):
    """RL generates with the model it trains: the engine must never use stale weights."""
    model = random_model(seed=2)
    engine = Engine(model, tok, max_batch=2)
    prompt = prompts(tok)[0]
    before = engine.generate_batch(prompt, max_tokens=20, temperature=0)[0][0]
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_k.weight.mul_(-1.5)  # in place, like an optimizer step
    after = engine.generate_batch(prompt, max_tokens=20, temperature=0)[0][0]
    assert after[len(prompt):] == generate_without_cache(model, prompt, 20, engine.stop_ids)
    assert after != before


def test_cpu_engine_is_fp32_and_shares_the_model_weights(tok, model):
    """On CPU the engine computes in fp32, as the model does: an fp32 KV cache, and no copies of
    single weights (the stacked q/k/v matrix is its only one)."""
    engine = Engine(model, tok, max_batch=2)
    engine.generate_batch(prompts(tok)[0], max_tokens=3, temperature=0)
    assert engine.dtype == engine.cache.kv.dtype == torch.float32
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert engine._weight(("fc", 0), fc) is fc


def argmax_gaps(model, requests, dtype) -> list[float]:
    """Per generated token: how far below the model's own top logit the engine's choice is, by
    model.forward under autocast to `dtype` over the same sequence (0: the model's argmax)."""
    gaps = []
    for request in requests:
        for tokens in request.tokens:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
                logits = model(torch.tensor([request.prompt + tokens]))[0].float()
            for i, t in enumerate(tokens):
                row = logits[len(request.prompt) - 1 + i]
                gaps.append(float(row.max() - row[t]))
    return gaps


def test_bf16_engine_decodes_what_the_model_computes_under_autocast(tok, model):
    """The CUDA recipe (bf16 compute, KV cache and weight copies), run on CPU: rows at different
    positions, samples copied from one prefill, rows leaving. Every greedy token is the model's
    argmax under the same autocast, up to bf16 rounding. The caller sets no autocast: the engine
    does, as it must for the server, which steps it in a thread of its own."""
    engine = Engine(model, tok, max_batch=8, dtype=torch.bfloat16)
    assert engine.cache.kv.dtype == torch.bfloat16
    requests = engine.generate_many(prompts(tok), max_tokens=30, temperature=0, num_samples=2)
    gaps = argmax_gaps(model, requests, torch.bfloat16)
    assert len(gaps) == sum(len(t) for r in requests for t in r.tokens) > 100
    assert max(gaps) <= 0.1  # bf16 logits near 8 are 1/32 apart; a wrong position or weight is off by units
    assert {w.dtype for _, _, w in engine._weights.values()} == {torch.bfloat16}


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (sampling_probs(logits, 1.0, top_k=2)[0, 2:] == 0).all()
    assert (sampling_probs(logits, 1.0, top_k=2)[0, :2] > 0).all()
    # top_p: 4.0 holds ~64% of the mass, 4.0 + 3.0 ~87%: p=0.8 keeps exactly two
    probs = sampling_probs(logits, 1.0, top_p=0.8)
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_top_k_1_sampling_is_greedy(tok, model):
    engine = Engine(model, tok, max_batch=2)
    prompt = prompts(tok)[2]
    sampled, _ = engine.generate_batch(prompt, max_tokens=20, temperature=1.5, top_k=1, seed=3)
    assert sampled[0][len(prompt):] == generate_without_cache(model, prompt, 20, engine.stop_ids)


def test_temperature_too_small_to_divide_by_is_greedy(tok, model):
    engine = Engine(model, tok, max_batch=2)
    prompt = prompts(tok)[2]
    greedy, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0)
    for t in (1e-200, 5e-324, 1e-6):
        out, _ = engine.generate_batch(prompt, max_tokens=12, temperature=t, seed=1)
        assert out == greedy, t


class PoisonedEngine(Engine):
    """The model breaks (NaN logits) for the requests in `poisoned`, from their 3rd decode step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned: set[int] = set()

    def _decode(self):
        logits = super()._decode()
        for i, row in enumerate(self.rows):
            if row.request.id in self.poisoned and row.generated >= 3:
                logits[i] = float("nan")
        return logits


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_poisoned_request_ends_alone_and_the_other_11_streams_finish(tok, model, temperature):
    ps = [prompts(tok)[i % 4] for i in range(12)]
    clean = Engine(model, tok, max_batch=12).generate_many(ps, max_tokens=10, temperature=temperature, seed=5)
    engine = PoisonedEngine(model, tok, max_batch=12)
    requests = [engine.add_request(p, max_tokens=10, temperature=temperature, seed=5, num_samples=1) for p in ps]
    engine.poisoned.add(requests[5].id)
    while engine.has_work():
        engine.step()
    assert requests[5].finish_reasons == ["error"] and "non-finite" in requests[5].error
    assert len(requests[5].tokens[0]) == 3  # what it made before the fault is kept
    for i, (r, c) in enumerate(zip(requests, clean)):
        if i != 5:
            assert r.error is None and r.finish_reasons[0] in ("stop", "length")
            assert r.tokens == c.tokens  # untouched by the neighbour's failure


def test_a_request_whose_sampling_raises_ends_alone(tok, model, monkeypatch):
    engine = Engine(model, tok, max_batch=4)
    good = engine.add_request(prompts(tok)[0], max_tokens=8, temperature=0.8, seed=1)
    bad = engine.add_request(prompts(tok)[1], max_tokens=8, temperature=0.8, top_p=0.5, seed=1, num_samples=2)
    real = engine_mod.sampling_probs

    def flaky(logits, temperature, top_k=None, top_p=None):
        if top_p == 0.5:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, temperature, top_k, top_p)

    monkeypatch.setattr(engine_mod, "sampling_probs", flaky)
    while engine.has_work():
        engine.step()
    assert bad.finish_reasons == ["error", "error"] and "probability tensor" in bad.error
    assert good.error is None and good.finish_reasons[0] in ("stop", "length") and good.tokens[0]


class ScriptedEngine(Engine):
    """The real engine, except that scripted requests sample from a script (a stub policy):
    their n-th sampled token is script[n], then <|assistant_end|>. Records, per step of a
    scripted row, the sequence so far and the model's logits for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scripts: dict[int, list[int]] = {}
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def _choose(self, rows, logits):
        chosen = super()._choose(rows, logits)
        for j, row in enumerate(rows):
            script = self.scripts.get(row.request.id)
            if script is not None:
                n_sampled = sum(row.request.masks[row.sample])
                end = self.tokenizer.id_of("<|assistant_end|>")
                chosen[j] = script[n_sampled] if n_sampled < len(script) else end
                self.seen.append((row.request.prompt + row.request.tokens[row.sample], logits[j].clone()))
        return chosen


def tool_call(tok: Tokenizer, code: str, after: str) -> list[int]:
    return [tok.id_of("<|python_start|>")] + tok.encode(code) + [tok.id_of("<|python_end|>")] + tok.encode(after)


def test_tool_call_gets_calculator_output_injected(tok, model):
    engine = ScriptedEngine(model, tok, max_batch=2)
    script = tool_call(tok, "1+2", " so 3")
    request = engine.add_request(prompts(tok)[0], max_tokens=50, temperature=0)
    engine.scripts[request.id] = script
    while engine.has_work():
        engine.step()

    output = [tok.id_of("<|output_start|>")] + tok.encode("3") + [tok.id_of("<|output_end|>")]
    n_call = len(script) - len(tok.encode(" so 3"))
    assert request.tokens[0] == script[:n_call] + output + script[n_call:]
    assert request.masks[0] == [1] * n_call + [0] * len(output) + [1] * (len(script) - n_call)
    assert request.finish_reasons[0] == "stop"
    # the forced tokens went through the model like prompt tokens: the cached logits after them
    # equal a full forward over the whole sequence
    for seq, logits in engine.seen[-3:]:
        with torch.no_grad():
            full = model(torch.tensor([seq]))[0, -1]
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert tok.id_of("<|output_end|>") in engine.seen[-1][0]


def test_python_tool_runs_in_sandbox_while_other_rows_decode(tok, model):
    engine = ScriptedEngine(model, tok, max_batch=4)
    script = tool_call(tok, "print(6 * 7)", " ok")
    scripted = engine.add_request(prompts(tok)[1], max_tokens=50, temperature=0)
    engine.scripts[scripted.id] = script
    other = engine.add_request(prompts(tok)[3], max_tokens=40, temperature=0)
    while engine.has_work():
        engine.step()
    engine.close()

    output = [tok.id_of("<|output_start|>")] + tok.encode("42") + [tok.id_of("<|output_end|>")]
    n_call = len(script) - len(tok.encode(" ok"))
    assert scripted.tokens[0] == script[:n_call] + output + script[n_call:]
    # the other row shared the batch with a row idling on the tool, and is unaffected
    assert other.tokens[0] == generate_without_cache(model, prompts(tok)[3], 40, engine.stop_ids)


def test_stop_token_length_and_context_limits(tok, model):
    engine = ScriptedEngine(model, tok, max_batch=2, max_seq_len=64)
    request = engine.add_request(prompts(tok)[0], max_tokens=50, temperature=0)
    engine.scripts[request.id] = tok.encode(" hello")
    while engine.has_work():
        engine.step()
    assert request.tokens[0] == tok.encode(" hello")  # <|assistant_end|> ends it and is not included
    assert request.finish_reasons[0] == "stop"

    engine.stop_ids = frozenset()  # run until the context is full
    prompt = tok.encode("a b c d e f g h i j " * 5, prepend="<|bos|>")[:50]
    (full,) = engine.generate_many([prompt], max_tokens=1000, temperature=0)
    assert full.finish_reasons[0] == "length"
    assert len(prompt) + len(full.tokens[0]) == 64  # generation stops when the context is full


def test_cancel_frees_rows(tok, model):
    engine = Engine(model, tok, max_batch=2)
    engine.stop_ids = frozenset()  # only cancel or the budget ends these
    request = engine.add_request(prompts(tok)[0], num_samples=2, max_tokens=100, temperature=0.8, seed=0)
    for _ in range(3):
        engine.step()
    engine.cancel(request)
    events = engine.step()
    assert request.finish_reasons == ["cancelled", "cancelled"]
    assert {e.finish_reason for e in events if e.token is None} == {"cancelled"}
    assert not engine.rows and not engine.has_work()

    waiting = [engine.add_request(prompts(tok)[0], num_samples=2, max_tokens=5, temperature=0) for _ in range(2)]
    engine.cancel(waiting[1])  # still waiting for rows
    while engine.has_work():
        engine.step()
    assert waiting[0].finish_reasons == ["length", "length"]
    assert waiting[1].finish_reasons == ["cancelled", "cancelled"] and waiting[1].tokens == [[], []]


def test_generate_streams_events_and_stops_cleanly_when_abandoned(tok, model):
    engine = Engine(model, tok, max_batch=2)
    engine.stop_ids = frozenset()
    events = list(engine.generate(prompts(tok)[0], max_tokens=5, temperature=0))
    assert [e.token is None for e in events] == [False] * 5 + [True]
    assert events[-1].finish_reason == "length"
    stream = engine.generate(prompts(tok)[0], max_tokens=50, temperature=0)
    next(stream)
    stream.close()  # a consumer that stops reading cancels its request
    assert not engine.has_work()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=VOCAB + 1), "top_k"),
    (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(num_samples=0), "num_samples"),
    (dict(num_samples=3), "num_samples"), (dict(seed="x"), "seed"),
])
def test_bad_sampling_params_name_the_field(tok, model, kwargs, field):
    engine = Engine(model, tok, max_batch=2)
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompts(tok)[0], **kwargs)


def test_bad_prompts_and_settings_are_clear_errors(tok, model):
    engine = Engine(model, tok, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="no room"):
        engine.add_request(list(range(32)))
    with pytest.raises(ValueError, match="token id"):
        engine.add_request([1, VOCAB])
    with pytest.raises(ValueError, match="non-empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, tok, max_seq_len=10**6)
    with pytest.raises(ValueError, match="vocab_size"):
        Engine(GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)), tok)


def test_kv_cache_reserve_keeps_contents_and_respects_max_len():
    cache = KVCache(n_layer=1, n_kv_head=1, head_dim=2, rows=1, max_len=40, device="cpu", dtype=torch.float32,
                    capacity=8)
    cache.kv[..., :8, :] = torch.arange(8.0)[:, None]
    cache.reserve(9)
    assert cache.capacity == 16 and torch.equal(cache.kv[0, 0, 0, 0, :8, 0], torch.arange(8.0))
    cache.reserve(17)
    assert cache.capacity == 32
    cache.reserve(33)
    assert cache.capacity == 40  # doubling, capped at max_len
    with pytest.raises(ValueError, match="max_len"):
        cache.reserve(41)


def test_text_stream_holds_back_split_characters(tok):
    text = "naïve 😀 ok"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
