"""The lineage walk over upstream manifests: ancestors, missing links, closures, and gc's keep set."""

import hashlib
import time

import pytest

from nanopipe import cli, lineage, loading, runner
from nanopipe.store import Store, StoreError


def commit(store: Store, stage: str, tag: str, upstream: dict | None = None) -> dict:
    key = hashlib.sha256(f"{stage}/{tag}".encode()).hexdigest()
    w = store.writer(stage, key)
    w.write_bytes("out.txt", f"{stage} {tag}".encode())
    return w.commit(config={}, upstream=upstream or {}, code_version="v1", metrics={}, started_at=time.time())


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


@pytest.fixture
def chain(store):
    """tokenizer, data -> base_train -> mid_train -> sft (sft and mid_train list no tokenizer)."""
    m = {"tokenizer": commit(store, "tokenizer", "a"), "data": commit(store, "data", "a")}
    m["base_train"] = commit(store, "base_train", "a", {"tokenizer": m["tokenizer"], "data": m["data"]})
    m["mid_train"] = commit(store, "mid_train", "a", {"base_train": m["base_train"]})
    m["sft"] = commit(store, "sft", "a", {"mid_train": m["mid_train"]})
    return m


def label(m: dict) -> str:
    return f"{m['stage']}/{m['key'][:16]}"


def test_ancestor_follows_the_lineage_nearest_first(store, chain):
    assert lineage.ancestor(store, chain["sft"], "data") == chain["data"]
    assert loading.tokenizer_of(store, chain["sft"]) == chain["tokenizer"]
    # A tokenizer listed directly is nearer than the one base_train was built with.
    other = commit(store, "tokenizer", "b")
    rl = commit(store, "rl", "a", {"tokenizer": other, "sft": chain["sft"]})
    assert lineage.ancestor(store, rl, "tokenizer") == other


def test_missing_upstream_is_named(store, chain):
    store.remove(store.stage_dir("data", chain["data"]["key"]))
    with pytest.raises(StoreError, match=f"^{label(chain['data'])} \\(upstream of {label(chain['base_train'])}\\) "
                                         "is no longer in the store$"):
        lineage.ancestor(store, chain["sft"], "data")
    store.remove(store.stage_dir("mid_train", chain["mid_train"]["key"]))
    with pytest.raises(StoreError, match=f"^{label(chain['sft'])}: no tokenizer stage in its lineage; part of its "
                                         f"lineage is no longer in the store: {label(chain['mid_train'])} "
                                         f"\\(upstream of {label(chain['sft'])}\\)$"):
        loading.tokenizer_of(store, chain["sft"])


def test_no_such_stage_in_the_lineage(store, chain):
    with pytest.raises(StoreError, match=f"^{label(chain['base_train'])}: no sft stage in its lineage$"):
        lineage.ancestor(store, chain["base_train"], "sft")


def test_walk_reads_each_manifest_once_and_closure_stops_at_gaps(store, chain, monkeypatch):
    diamond = commit(store, "chat_eval", "a", {"mid_train": chain["mid_train"], "sft": chain["sft"]})
    reads = []
    real = store.manifest
    monkeypatch.setattr(store, "manifest", lambda stage, key: reads.append(stage) or real(stage, key))
    links = [(up.of["stage"], up.stage) for up in lineage.walk(store, diamond)]
    assert links == [("chat_eval", "mid_train"), ("chat_eval", "sft"), ("mid_train", "base_train"),
                     ("sft", "mid_train"), ("base_train", "tokenizer"), ("base_train", "data")]
    assert sorted(reads) == sorted(["mid_train", "sft", "base_train", "tokenizer", "data"])
    assert set(lineage.closure(store, [diamond])) == {m["key"] for m in chain.values()} | {diamond["key"]}
    store.remove(store.stage_dir("base_train", chain["base_train"]["key"]))
    assert set(lineage.closure(store, [chain["sft"]])) == {chain["sft"]["key"], chain["mid_train"]["key"]}


def test_gc_keeps_the_lineage_of_what_the_config_built(store, chain, monkeypatch, capsys):
    orphan = commit(store, "base_train", "old", {"tokenizer": chain["tokenizer"], "data": chain["data"]})
    unfinished = store.writer("sft", "f" * 64)  # a crashed run: files, no manifest
    unfinished.write_bytes("partial.bin", b"x")
    # The config has built sft only: gc keeps sft's whole lineage, drops the rest.
    monkeypatch.setattr(runner, "committed", lambda store, cfg: {"sft": chain["sft"]})
    cli.main(["gc", "--store", store.url, "--yes", "--min-age", "0"])
    out = capsys.readouterr().out
    assert "2 dirs removed; kept 5" in out
    assert store.manifest("base_train", orphan["key"]) is None and not store.fs.exists(unfinished.dir)
    assert all(store.manifest(s, m["key"]) == m for s, m in chain.items())
