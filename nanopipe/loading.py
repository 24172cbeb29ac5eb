"""Load committed artifacts from the store for inference: models, tokenizers, and which ones to use.

Every file is verified against its manifest's sha256 before use, and weights are safetensors
(tensors and nothing else), so nothing read from a shared store can execute code.
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

from nanopipe.dag import in_order
from nanopipe.lineage import ancestor
from nanopipe.model import GPT, GPTConfig, rotary_tables
from nanopipe.store import Store, StoreError
from nanopipe.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.ranks", "tokenizer.json")
MODEL_FILE = "model.safetensors"  # a training stage's weights (and a checkpoint's), beside model_config.json
LEGACY_MODEL_FILE = "model.pt"  # the torch pickle of stores built before safetensors: refused, by name
# The stages that commit a model (MODEL_FILE), most finished first.
MODEL_STAGES = tuple(reversed(in_order({"base_train", "mid_train", "sft", "rl"})))


def load_tokenizer(store: Store, tokenizer_manifest: dict) -> Tokenizer:
    return Tokenizer.from_files({rel: store.read_bytes(tokenizer_manifest, rel) for rel in TOKENIZER_FILES})


def load_model(store: Store, manifest: dict, device: str | torch.device = "cpu") -> GPT:
    """The model a training stage committed (model.safetensors + model_config.json), in eval mode."""
    weights = store.local_path(manifest, model_file(manifest))
    mcfg = json.loads(store.read_bytes(manifest, "model_config.json"))
    mcfg.pop("depth", None)
    with torch.device("meta"):
        model = GPT(GPTConfig(**mcfg))
    model.to_empty(device=device)
    model.load_state_dict(safetensors.torch.load_file(weights, device=str(device)))
    # Rotary tables are non-persistent buffers: recompute them on the real device.
    model.cos, model.sin = rotary_tables(model.rotary_seq_len, model.config.head_dim, device=device)
    return model.eval()


def model_file(manifest: dict) -> str:
    """MODEL_FILE, if the manifest holds a model; a StoreError naming what it holds otherwise."""
    files = {f["path"] for f in manifest["files"]}
    if MODEL_FILE in files:
        return MODEL_FILE
    where = f"{manifest['stage']}/{manifest['key'][:16]}"
    if LEGACY_MODEL_FILE in files:
        raise StoreError(f"{where} holds {LEGACY_MODEL_FILE}, the weights format of nanopipe before "
                         f"{MODEL_FILE}; rebuild it with this version (`nanopipe run` rebuilds it: its key changed)")
    raise StoreError(f"{where} holds no model")


def tokenizer_of(store: Store, manifest: dict) -> dict:
    """The tokenizer manifest a model was trained with (the nearest in its lineage)."""
    return ancestor(store, manifest, "tokenizer")


def find_model(store: Store, spec: str | None = None) -> dict:
    """A model manifest: by key prefix, by stage name (its newest), or the newest of the most finished stage."""
    if spec and spec not in MODEL_STAGES:
        m = store.find(spec.split("/")[-1])
        model_file(m)
        return m
    for stage in [spec] if spec else MODEL_STAGES:
        found = store.manifests(stage)
        if found:
            return found[-1]
    raise StoreError(f"no committed {spec or 'model'} in {store.url}; run the pipeline first")
