"""Leave the pipeline: a committed model as a Hugging Face directory that runs with plain transformers.

    checks = export_model(model, tok, "out/")        # config.json, model.safetensors, tokenizer.json, ...
    export_committed(store, manifest, "out/")        # a model from the store, its model card filled from its lineage
    export_main / push_main                          # `nanopipe export` and `nanopipe push`

The directory uses transformers' NanoChat architecture (no custom code): our model *is* classic
nanochat, so every detail maps one to one (checked in `_check_expressible`, and the written
directory is loaded back and compared before it is kept):

    ours (nanopipe/model.py)                      NanoChat (transformers)
    transformer.wte / lm_head (untied)            model.embed_tokens / lm_head, tie_word_embeddings=False
    lm_head rows padded to a multiple of 64       only the first vocab_size rows (the padded logits are sliced off anyway)
    norm(): F.rms_norm, no weight, eps=None       NanoChatRMSNorm (no weight), rms_norm_eps = float32 machine eps
      (= torch.finfo(float32).eps in fp32)        (it normalises in float32)
    norm after the embedding, pre-norm blocks,    the same ("additional norm before the layers")
      norm before lm_head
    rotary on channel pairs (i, i + D/2),         rotate_half (half-split), inv_freq = base^(-2i/D), rope_theta = 10000
      base 10000
    QK norm after rotary                          q_norm / k_norm after apply_rotary_pos_emb
    c_q c_k c_v c_proj, no bias, GQA              q_proj k_proj v_proj o_proj, attention_bias=False, num_key_value_heads
    MLP c_fc -> relu(x)^2 -> c_proj               fc1 -> "relu2" -> fc2, intermediate_size = 4 x width
    logits 15 * tanh(logits / 15)                 final_logit_softcapping = 15

The tokenizer becomes a `tokenizers` byte-level BPE (transformers' tiktoken converter: every
split of a token into two tokens is a merge ranked by the token, and whole pieces found in the
vocabulary are taken as is, as tiktoken does), with our split pattern and special tokens. The
chat template renders a conversation to the ids of nanopipe.chat (see CHAT_TEMPLATE).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from nanopipe import model as ours
from nanopipe.chat import render_conversation, render_for_completion
from nanopipe.dag import in_order
from nanopipe.lineage import closure
from nanopipe.model import GPT
from nanopipe.store import Store, StoreError
from nanopipe.tokenizer import EVAL_TEXTS, RANKS_FILE, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS_FILE = "model.safetensors"
LOGITS_TOLERANCE = 1e-4  # max |ours - transformers| over the probe prompts, in fp32
BOS, STOP = "<|bos|>", "<|assistant_end|>"

# The GPTConfig fields this mapping knows. A new field is a new model detail: fail until it is mapped.
_KNOWN_CONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}

# Our parameter names -> NanoChat's (every parameter must match exactly one pattern).
_WEIGHT_NAMES = [
    (r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.fc1.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.fc2.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]

# nanopipe.chat's format as a Jinja template. add_generation_prompt=True gives render_for_completion
# (a final assistant message is dropped, then <|assistant_start|>); False gives render_conversation's ids.
# A leading system message is merged into the first user message ("system\n\nuser"): the model has
# no system role. Assistant content is a string or a list of parts: text, python (a tool call),
# python_output (the tool's answer).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- endif -%}"
    "{%- if not messages -%}{{- raise_exception('a conversation needs a user message') -}}{%- endif -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] == 'assistant' -%}"
    "{%- set messages = messages[:-1] -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('roles must alternate user, assistant, ... starting with user (after an optional system message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}{%- if loop.first and system is not none -%}{{- system + '\n\n' -}}{%- endif -%}"
    "{{- message['content'] -}}{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown assistant part type: ' + part['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)

# What every export is checked on before it is kept: text that stresses the tokenizer (CJK,
# emoji with modifiers and joiners, combining marks, whitespace runs, digits, CR LF, control and
# unusual space characters) and conversations (multi-turn, system, a tool call).
PROBE_TEXTS = [
    *EVAL_TEXTS.values(),
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷 and 日本語のテキスト、中文，한국어 텍스트",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0335\u0321\u0317 \u0915\u094d\u0937",
    "   leading spaces\t\ttabs\n\n\n   \n  trailing   ",
    "digits 0 12 345 6789 3.14159 1,000,000 -42 0x1F ٣٤٥ ४५६",
    "windows\r\nline\r\n\r\nendings\rcr",
    "controls \x00\x01\x07\x1b[31mred\x1b[0m \x7f and spaces \u00a0\u2003\u3000\u2028\u2029\u200b\ufeff",
    "I'm sure you'RE right; they'll say WE'VE done it, it's JOHN'S",
]
PROBE_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi! Who are you?"}]},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute: "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "12*7 = 84."},
        ]},
        {"role": "user", "content": "And  12 * 8 ? 🙂"},
        {"role": "assistant", "content": "96."},
    ]},
]


class ExportError(ValueError):
    """The model cannot be exported exactly, or the written directory does not match; the message says what."""


def _transformers():
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as e:
        raise ExportError(f"exporting needs transformers and safetensors ({e}): "
                          "pip install 'nanopipe[dev]' or run `make setup`") from None
    return transformers


# ----- the model -----

def _check_expressible(model: GPT) -> None:
    """ExportError naming the first detail of our model that transformers' NanoChat cannot express
    (a parameter it has no place for, such as a bias, is named by hf_state_dict)."""
    cfg = model.config
    extra = {f.name for f in dataclasses.fields(cfg)} - _KNOWN_CONFIG_FIELDS
    if extra:
        raise ExportError(f"GPTConfig has fields the NanoChat mapping does not know: {sorted(extra)}")
    for name, _ in model.named_buffers():
        if name not in ("cos", "sin"):
            raise ExportError(f"model buffer {name!r} has no NanoChat equivalent")
    if model.transformer.wte.weight.shape[0] != cfg.vocab_size:
        raise ExportError(f"the embedding has {model.transformer.wte.weight.shape[0]} rows, not vocab_size {cfg.vocab_size}")
    if model.lm_head.weight.shape[0] < cfg.vocab_size:
        raise ExportError(f"lm_head has {model.lm_head.weight.shape[0]} rows, fewer than vocab_size {cfg.vocab_size}")
    for block in model.transformer.h:
        if block.attn.head_dim * block.attn.n_head != cfg.n_embd:
            raise ExportError(f"head_dim {block.attn.head_dim} x {block.attn.n_head} heads != width {cfg.n_embd}: "
                              "NanoChat derives head_dim as hidden_size / num_attention_heads")
        if block.mlp.c_fc.out_features != model.transformer.h[0].mlp.c_fc.out_features:
            raise ExportError("MLP widths differ between layers; NanoChat has one intermediate_size")


def hf_config(model: GPT, tok: Tokenizer, dtype: str = "float32") -> dict:
    """config.json for transformers' NanoChatConfig."""
    transformers = _transformers()
    _check_expressible(model)
    cfg = model.config
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=model.transformer.h[0].mlp.c_fc.out_features,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.sequence_len,  # the context it was trained on
        hidden_act="relu2",
        rms_norm_eps=torch.finfo(torch.float32).eps,  # F.rms_norm's eps=None on fp32 activations
        rope_parameters={"rope_type": "default", "rope_theta": float(ours.ROPE_BASE)},
        final_logit_softcapping=float(ours.LOGIT_SOFTCAP),
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.id_of(STOP),
        # No pad id in the model: NanoChat would make it the embedding's padding_idx, whose row
        # fine-tuning then never updates (padding is BOS, see the tokenizer and generation config).
        pad_token_id=None,
        dtype=dtype,
        architectures=["NanoChatForCausalLM"],
    )
    # Validated by transformers' own config class; written with every field that matters spelled
    # out (not as a diff against defaults a later transformers could change), and nothing else.
    full = transformers.NanoChatConfig(**fields).to_dict()
    return {k: full[k] for k in (*fields, "model_type", "transformers_version")}


def hf_state_dict(model: GPT, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Our weights under NanoChat's names, contiguous, in `dtype`; lm_head without its padding rows."""
    out = {}
    for name, tensor in model.state_dict().items():
        for pattern, target in _WEIGHT_NAMES:
            if re.fullmatch(pattern, name):
                break
        else:
            raise ExportError(f"parameter {name!r} has no place in transformers' NanoChat")
        tensor = tensor.detach().to("cpu", DTYPES[dtype])
        if name == "lm_head.weight":
            tensor = tensor[:model.config.vocab_size]
        out[re.sub(pattern, target, name)] = tensor.contiguous()
    return out


# ----- the tokenizer -----

def hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` with the same ids as ours (byte-level BPE, our pattern, our specials)."""
    _transformers()
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / RANKS_FILE
        ranks.write_bytes(tok.to_files()[RANKS_FILE])
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=tok.pattern,
                                    extra_special_tokens=list(tok.special_tokens)).converted()
    for name, tid in tok.special_tokens.items():
        if backend.token_to_id(name) != tid:
            raise ExportError(f"special token {name} got id {backend.token_to_id(name)} in tokenizer.json, ours is {tid}")
    return backend


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json, in the form both transformers 4.x and 5.x read."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": STOP,
        "pad_token": BOS,  # what our SFT pads rows with
        "additional_special_tokens": [s for s in tok.special_tokens if s not in (BOS, STOP)],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tok: Tokenizer) -> dict:
    """Our engine's stop tokens (engine.Engine.stop_ids): the end of the assistant's turn, or a new document."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.id_of(STOP), tok.bos_id], "pad_token_id": tok.bos_id}


# ----- writing and checking -----

def export_model(model: GPT, tok: Tokenizer, out_dir: str | os.PathLike, dtype: str = "float32",
                 info: CardInfo | None = None) -> dict:
    """Write the Hugging Face directory to out_dir (which must not exist or be empty) and check it
    loads with transformers to our numbers; returns the check's measurements. The model card
    describes `info` (lineage, evaluations, data, licence). On any failure nothing is left at out_dir."""
    from safetensors.torch import save_file

    check_dtype(dtype)
    if tok.vocab_size != model.config.vocab_size:
        raise ExportError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose another output or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(_json(hf_config(model, tok, dtype)))
        save_file(hf_state_dict(model, dtype), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        hf_tokenizer(tok).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(_json(tokenizer_config(tok, model.config.sequence_len)))
        (tmp / "generation_config.json").write_text(_json(generation_config(tok)))
        checks = verify_export(tmp, model, tok, dtype)
        (tmp / "README.md").write_text(model_card(model, dtype, checks, info or CardInfo()))
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp and safetensors make private files; the export gets the usual modes
        for path in (tmp, *tmp.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checks


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def probe_prompts(tok: Tokenizer, max_len: int) -> list[list[int]]:
    """Token ids the logits are compared on: chat prompts, a whole conversation, plain text."""
    prompts = [render_for_completion(tok, c) for c in PROBE_CONVERSATIONS]
    prompts.append(render_conversation(tok, PROBE_CONVERSATIONS[-1], max_tokens=None)[0])
    prompts += [tok.encode(t, prepend=BOS) for t in PROBE_TEXTS[:3]]
    return [p[:max_len] for p in prompts]


@torch.no_grad()
def verify_export(directory: str | os.PathLike, model: GPT, tok: Tokenizer, dtype: str = "float32") -> dict:
    """Load the directory with transformers (local files, no custom code) and compare with ours:
    logits on the probe prompts, token ids on the probe texts, chat template ids on the probe
    conversations. ExportError if anything differs; else the measurements."""
    transformers = _transformers()
    directory = str(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True, trust_remote_code=False).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if type(hf_model).__name__ != "NanoChatForCausalLM":
        raise ExportError(f"{directory} loads as {type(hf_model).__name__}, not NanoChatForCausalLM")

    bad = [t for t in PROBE_TEXTS if hf_tok.encode(t, add_special_tokens=False) != tok.encode(t)]
    if bad:
        raise ExportError(f"tokenizer.json encodes {len(bad)} probe text(s) differently, first: {bad[0][:60]!r}")
    for conv in PROBE_CONVERSATIONS:
        for gen, expected in ((True, render_for_completion(tok, conv)),
                              (False, render_conversation(tok, conv, max_tokens=None)[0])):
            got = list(hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=gen, tokenize=True,
                                                  return_dict=True)["input_ids"])
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise ExportError(f"the chat template (add_generation_prompt={gen}) renders {len(got)} ids where "
                                  f"nanopipe.chat gives {len(expected)}, first differing at position {at}")

    reference = model  # compared at the exported precision, both computed in fp32
    if any(p.dtype != DTYPES[dtype] or p.dtype != torch.float32 for p in model.parameters()):
        reference = copy.deepcopy(model)
        for p in reference.parameters():
            p.data = p.data.to(DTYPES[dtype]).float()
        reference.cos, reference.sin = ours.rotary_tables(reference.rotary_seq_len, model.config.head_dim,
                                                          device=reference.get_device())
    device = reference.get_device()
    diffs = []
    for ids in probe_prompts(tok, min(model.config.sequence_len, model.rotary_seq_len)):
        x = torch.tensor([ids], device=device)
        ref_logits = reference(x).float().cpu()
        hf_logits = hf_model(input_ids=x.cpu()).logits.float()
        diffs.append(float((ref_logits - hf_logits).abs().max()))
    worst = max(diffs)
    if not math.isfinite(worst) or worst > LOGITS_TOLERANCE:
        raise ExportError(f"transformers' logits differ from ours by up to {worst:.3g} (tolerance {LOGITS_TOLERANCE}); "
                          "the mapping to NanoChat is not exact")
    return {"logits_max_abs_diff": worst, "logits_max_abs_diff_per_prompt": diffs, "probe_prompts": len(diffs),
            "probe_texts": len(PROBE_TEXTS), "probe_conversations": len(PROBE_CONVERSATIONS),
            "transformers_version": transformers.__version__}


def checks_markdown(checks: dict) -> str:
    per_prompt = ", ".join(f"{d:.2e}" for d in checks["logits_max_abs_diff_per_prompt"])
    return (f"Loaded back with transformers {checks['transformers_version']} (no custom code) and compared with "
            f"nanopipe's own model before it was kept: logits on {checks['probe_prompts']} prompts agree to "
            f"{checks['logits_max_abs_diff']:.2e} max abs difference in fp32 (per prompt: {per_prompt}); "
            f"token ids equal on {checks['probe_texts']} probe texts (CJK, emoji, combining marks, whitespace "
            f"runs, digits, CR LF, control characters); the chat template gives nanopipe's ids on "
            f"{checks['probe_conversations']} conversations (multi-turn, system message, a tool call).")


# ----- the model card -----

# Committed files that say where a stage's data came from (and under which licence).
PROVENANCE_FILES = ("provenance.json", "mixture.json", "rl_data.json")
EVAL_STAGES = ("base_eval", "chat_eval")
_CARD_METRICS = ("steps", "tokens", "sampled_tokens", "final_loss", "val_bpb", "val_loss", "pass@1_before", "pass@1_after",
                 "vocab_size", "train_chars", "heldout_bytes_per_token", "conversations", "device", "world_size")


@dataclasses.dataclass
class CardInfo:
    """What the model card says about where a model came from."""
    source: str = "-"  # stage/key of the exported model
    lineage: list[dict] = dataclasses.field(default_factory=list)  # committed manifests that built it, in pipeline order
    evals: list[dict] = dataclasses.field(default_factory=list)  # base_eval / chat_eval manifests of the lineage
    data: list[list[str]] = dataclasses.field(default_factory=list)  # rows: stage, source, version, licence
    license: str = "mit"


def lineage(store: Store, manifest: dict) -> list[dict]:
    """A manifest and every committed manifest upstream of it, each once, in pipeline order."""
    found = closure(store, [manifest]).values()
    rank = {stage: i for i, stage in enumerate(in_order(m["stage"] for m in found))}
    return sorted(found, key=lambda m: (rank[m["stage"]], m["created_at"], m["key"]))


def evaluates(eval_manifest: dict, chain: list[dict]) -> bool:
    """Whether an evaluation was computed from models (and tokenizer, data) of this lineage."""
    keys = {m["key"] for m in chain}
    return all(up["key"] in keys for up in eval_manifest["upstream"].values())


def evaluations_of(store: Store, chain: list[dict]) -> list[dict]:
    """The newest committed evaluation of each kind that measured this lineage."""
    found = []
    for stage in EVAL_STAGES:
        hits = [m for m in store.manifests(stage) if evaluates(m, chain)]
        if hits:
            found.append(hits[-1])
    return found


def data_sources(store: Store, chain: list[dict]) -> list[list[str]]:
    """Rows (stage, source, version, licence) from the lineage's provenance files: every recorded
    package with its licence, and the tasks nanopipe generates itself."""
    rows: list[list[str]] = []

    def walk(node, stage: str) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, stage)
            return
        if not isinstance(node, dict):
            return
        if "license" in node:
            name = node.get("package") or node.get("name") or node.get("task") or node.get("kind", "-")
            rows.append([stage, str(name), str(node.get("version", "-")), str(node["license"])])
        elif "task" in node and not any(k in node for k in ("tasks", "source")):
            rows.append([stage, str(node["task"]), "-", "generated by nanopipe (MIT)"])
        for value in node.values():
            walk(value, stage)

    for m in chain:
        for f in m["files"]:
            if f["path"] in PROVENANCE_FILES:
                walk(json.loads(store.read_bytes(m, f["path"])), m["stage"])
    unique = []
    for row in rows:
        if row not in unique:
            unique.append(row)
    return unique


def card_info(store: Store, manifest: dict, evals: list[dict] | None = None, license: str = "mit") -> CardInfo:
    """The card's facts about a committed model; evals default to those found in the store."""
    chain = lineage(store, manifest)
    if evals is None:
        evals = evaluations_of(store, chain)
    return CardInfo(source=f"{manifest['stage']}/{manifest['key'][:16]}", lineage=chain,
                    evals=[e for e in evals if evaluates(e, chain)], data=data_sources(store, chain), license=license)


def model_card(model: GPT, dtype: str, checks: dict, info: CardInfo) -> str:
    from nanopipe.report import flatten, fmt, fmt_seconds, md_table

    c = model.config
    params = sum(p.numel() for p in model.parameters()) - (model.lm_head.weight.shape[0] - c.vocab_size) * c.n_embd
    name = f"nanochat d{c.n_layer}"
    out = [f"---\nlicense: {info.license}\nlibrary_name: transformers\npipeline_tag: text-generation\n"
           "tags:\n- nanochat\n- nanopipe\n---\n",
           f"# {name} ({info.source})\n",
           f"A {params:,}-parameter chat model in nanochat's classic architecture, trained end to end by "
           f"nanopipe (nanochat's pipeline as resumable stages) and exported from `{info.source}`. "
           "It runs with transformers' own `NanoChatForCausalLM`: no custom code.\n",
           "## Use\n",
           "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
           "path = \".\"  # this directory, or the hub repo id it was pushed to\n"
           "tok = AutoTokenizer.from_pretrained(path)\nmodel = AutoModelForCausalLM.from_pretrained(path)\n"
           "conversation = [{\"role\": \"user\", \"content\": \"What is 2+3?\"}]\n"
           "inputs = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True, "
           "return_tensors=\"pt\")\n"
           "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
           "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```\n",
           "## Model\n",
           md_table(["item", "value"], [
               ["parameters", params], ["layers", c.n_layer], ["width", c.n_embd],
               ["query / key-value heads", f"{c.n_head} / {c.n_kv_head}"], ["head dim", c.head_dim],
               ["MLP", f"ReLU², {model.transformer.h[0].mlp.c_fc.out_features} wide"],
               ["vocabulary", f"{c.vocab_size:,} (byte-level BPE, GPT-4-style split, 9 special tokens)"],
               ["trained context", f"{c.sequence_len:,} tokens (rotary, base {ours.ROPE_BASE})"],
               ["norms", "RMSNorm without weights; QK norm"], ["logit softcap", ours.LOGIT_SOFTCAP],
               ["weights", f"{dtype}, untied embedding and lm_head"]]) + "\n",
           "## Chat format\n",
           "`<|bos|>` then per turn `<|user_start|>…<|user_end|>` and `<|assistant_start|>…<|assistant_end|>`; "
           "a system message is merged into the first user message. The assistant may call a Python tool: "
           "`<|python_start|>code<|python_end|>`, answered by `<|output_start|>result<|output_end|>`; give "
           "assistant content as a list of parts `{\"type\": \"text\" | \"python\" | \"python_output\", \"text\": …}` "
           "to render them. Generation stops at `<|assistant_end|>` or `<|bos|>`. transformers does not run the "
           "tool: stop at `<|python_end|>`, run the code, append the output part and continue "
           "(nanopipe's own engine does this in a sandbox). `add_generation_prompt=True` drops a final "
           "assistant message, as nanopipe does when it prompts the model.\n",
           "## Training\n"]
    rows = []
    for m in info.lineage:
        flat = flatten(m["metrics"])
        brief = ", ".join(f"{k} {fmt(flat[k])}" for k in _CARD_METRICS if flat.get(k) is not None)
        rows.append([f"`{m['stage']}`", f"`{m['key'][:16]}`", fmt_seconds(m["timings"]["seconds"]),
                     m.get("host", {}).get("hostname", "-"), brief or "-"])
    if rows:
        total = sum(m["timings"]["seconds"] for m in info.lineage)
        out.append(md_table(["stage", "key", "wall time", "host", "highlights"], rows)
                   + f"\n\nTotal wall time of the stages that built it: **{fmt_seconds(total)}**.\n")
    else:
        out.append("- (exported outside a pipeline store: no lineage recorded)\n")
    out.append("## Evaluation\n")
    if info.evals:
        for e in info.evals:
            ups = ", ".join(f"{k} `{v['key'][:16]}`" for k, v in ((k, e["upstream"][k]) for k in in_order(e["upstream"])))
            metrics = [[f"`{k}`", v] for k, v in flatten(e["metrics"]).items()]
            out.append(f"`{e['stage']}` (`{e['key'][:16]}`, from {ups}):\n\n" + md_table(["metric", "value"], metrics) + "\n")
    else:
        out.append("- (no evaluation of this lineage in the store)\n")
    out.append("## Data\n")
    out.append(md_table(["stage", "source", "version", "licence"], info.data) + "\n" if info.data
               else "- (no provenance recorded)\n")
    out.append("## Limits\n\n"
               "- A small model trained on a small budget: it makes mistakes, invents facts and is mostly English. "
               "It has had no safety tuning; do not use it where errors matter.\n"
               "- Text that contains a special token's spelling (e.g. `<|bos|>`) becomes that special token in "
               "transformers' tokenizer (as with every HF chat tokenizer); nanopipe encodes such text as plain text.\n"
               "- Two consecutive text parts of one assistant message are tokenized as one text here, separately "
               "by nanopipe.\n")
    out.append("## Export check\n\n" + checks_markdown(checks) + "\n")
    out.append(f"## Licence\n\n`{info.license}` for the weights and code (nanopipe is MIT). The training data "
               "keeps its own licences (table above).\n")
    return "\n".join(out)


# ----- from the store -----

def export_committed(store: Store, manifest: dict, out_dir: str | os.PathLike, dtype: str = "float32",
                     evals: list[dict] | None = None, license: str = "mit", tokenizer: dict | None = None) -> dict:
    """Export a committed model (any stage that holds one) with the tokenizer of its lineage (or
    the given tokenizer manifest); evals default to the evaluations of its lineage in the store."""
    from nanopipe import loading

    tokenizer = tokenizer or loading.tokenizer_of(store, manifest)
    model = loading.load_model(store, manifest, "cpu")
    tok = loading.load_tokenizer(store, tokenizer)
    return export_model(model, tok, out_dir, dtype, card_info(store, manifest, evals, license))


def export_main(store_url: str | None, out: str, spec: str | None = None, dtype: str = "float32") -> None:
    """`nanopipe export --out DIR`: a committed model (default: the newest, most finished) as a HF directory."""
    from nanopipe.loading import find_model

    check_dtype(dtype)
    store = Store(store_url)
    manifest = find_model(store, spec)
    checks = export_committed(store, manifest, out, dtype)
    print(f"exported {manifest['stage']}/{manifest['key'][:16]} to {out} "
          f"(transformers logits within {checks['logits_max_abs_diff']:.2e} of ours)")


# ----- the hub -----

def _export_to_push(store: Store, spec: str | None, staging: Path, dtype: str) -> tuple[str, Path]:
    """(what, local dir) to upload: a committed export's verified files, or a model exported now.
    spec: an export's key prefix, "export" (the newest), or a model as for find_model; by default
    the newest committed export, else the newest model."""
    from nanopipe.loading import MODEL_STAGES, find_model

    manifest = None
    if spec in (None, "export"):
        exports = store.manifests("export")
        if exports:
            manifest = exports[-1]
        elif spec == "export":
            raise StoreError(f"no committed export in {store.url}; run the export stage or name a model")
    elif spec not in MODEL_STAGES:
        found = store.find(spec.split("/")[-1])
        manifest = found if found["stage"] == "export" else None
    folder = staging / "hf"
    if manifest is not None:  # copy out through the store's sha256 checks: a damaged file is never uploaded
        folder.mkdir()
        for f in manifest["files"]:
            shutil.copyfile(store.local_path(manifest, f["path"]), folder / f["path"])
        return f"export/{manifest['key'][:16]}", folder
    model = find_model(store, spec)
    export_committed(store, model, folder, dtype)
    return f"{model['stage']}/{model['key'][:16]}", folder


def push_main(store_url: str | None, repo_id: str, spec: str | None = None, private: bool = False,
              dtype: str = "float32") -> None:
    """`nanopipe push --repo NAME`: upload an export to the Hugging Face hub. The token is
    huggingface_hub's own (HF_TOKEN, or the one `hf auth login` stored); it is never printed or written."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"--repo {repo_id!r} is not a hub repo id: {e}") from None
    check_dtype(dtype)
    if not get_token():
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    store = Store(store_url)
    with tempfile.TemporaryDirectory(prefix="nanopipe-push-") as tmp:
        what, folder = _export_to_push(store, spec, Path(tmp), dtype)
        files = sorted(p.name for p in folder.iterdir())
        print(f"uploading {what} ({len(files)} files, {sum((folder / f).stat().st_size for f in files):,} bytes) "
              f"to {'private ' if private else ''}hub repo {repo_id}")
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                       commit_message=f"nanopipe export of {what}")
        except Exception as e:  # network, auth, quota: one line, never a traceback with request details
            raise ExportError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    print(f"pushed {what} to {getattr(commit, 'commit_url', None) or repo_id}")
