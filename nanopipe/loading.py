"""Load committed artifacts from the store for inference: models, tokenizers, and which ones to use.

Every file is verified against its manifest's sha256 before use, and weights are loaded with
torch.load(weights_only=True), so nothing read from a shared store can execute code.
"""

from __future__ import annotations

import json

import torch

from nanopipe.dag import in_order
from nanopipe.lineage import ancestor
from nanopipe.model import GPT, GPTConfig, rotary_tables
from nanopipe.store import Store, StoreError
from nanopipe.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.ranks", "tokenizer.json")
# The stages that commit a model (model.pt), most finished first.
MODEL_STAGES = tuple(reversed(in_order({"base_train", "mid_train", "sft", "rl"})))


def load_tokenizer(store: Store, tokenizer_manifest: dict) -> Tokenizer:
    return Tokenizer.from_files({rel: store.read_bytes(tokenizer_manifest, rel) for rel in TOKENIZER_FILES})


def load_model(store: Store, manifest: dict, device: str | torch.device = "cpu") -> GPT:
    """The model a training stage committed (model.pt + model_config.json), in eval mode."""
    mcfg = json.loads(store.read_bytes(manifest, "model_config.json"))
    mcfg.pop("depth", None)
    with torch.device("meta"):
        model = GPT(GPTConfig(**mcfg))
    model.to_empty(device=device)
    model.load_state_dict(torch.load(store.local_path(manifest, "model.pt"), map_location=device, weights_only=True))
    # Rotary tables are non-persistent buffers: recompute them on the real device.
    model.cos, model.sin = rotary_tables(model.rotary_seq_len, model.config.head_dim, device=device)
    return model.eval()


def tokenizer_of(store: Store, manifest: dict) -> dict:
    """The tokenizer manifest a model was trained with (the nearest in its lineage)."""
    return ancestor(store, manifest, "tokenizer")


def find_model(store: Store, spec: str | None = None) -> dict:
    """A model manifest: by key prefix, by stage name (its newest), or the newest of the most finished stage."""
    if spec and spec not in MODEL_STAGES:
        m = store.find(spec.split("/")[-1])
        if "model.pt" not in {f["path"] for f in m["files"]}:
            raise StoreError(f"{m['stage']}/{m['key'][:16]} holds no model")
        return m
    for stage in [spec] if spec else MODEL_STAGES:
        found = store.manifests(stage)
        if found:
            return found[-1]
    raise StoreError(f"no committed {spec or 'model'} in {store.url}; run the pipeline first")
