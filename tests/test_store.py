import datetime as dt
import json
import os
import posixpath
from pathlib import Path

import pytest

from nanopipe.store import (IntegrityError, Store, StoreError, cache_dir, core_bundle_cache, download_cache,
                            mirror_cache, output_digest, stage_key)


def _commit(store, stage="tok", key="a" * 64, files=None, upstream=None):
    w = store.writer(stage, key)
    for rel, data in (files or {"x.bin": b"hello"}).items():
        w.write_bytes(rel, data)
    return w.commit(config={"v": 1}, upstream=upstream or {}, code_version="v1", metrics={"m": 1.5}, started_at=0)


def test_key_is_canonical_and_sensitive():
    k = stage_key("s", "v1", {"a": 1, "b": [1, 2]}, {"u": "d"})
    assert k == stage_key("s", "v1", {"b": [1, 2], "a": 1}, {"u": "d"})
    assert k != stage_key("s", "v2", {"a": 1, "b": [1, 2]}, {"u": "d"})
    assert k != stage_key("s", "v1", {"a": 2, "b": [1, 2]}, {"u": "d"})
    assert k != stage_key("s", "v1", {"a": 1, "b": [1, 2]}, {"u": "e"})


def test_manifest_written_last_and_readable(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("tok", "b" * 64)
    w.write_bytes("x.bin", b"hello")
    assert store.manifest("tok", "b" * 64) is None  # files without a manifest do not exist
    m = w.commit(config={}, upstream={}, code_version="v1", metrics={"loss": 2.0}, started_at=0)
    assert store.manifest("tok", "b" * 64) == m
    assert m["files"] == [{"path": "x.bin", "bytes": 5, "sha256": m["files"][0]["sha256"]}]
    assert store.read_bytes(m, "x.bin") == b"hello"
    assert not [p for p in os.listdir(store.stage_dir("tok", "b" * 64)) if p.endswith(".tmp")]


def test_flipped_byte_is_detected_naming_the_file(tmp_path):
    store = Store(str(tmp_path))
    m = _commit(store, files={"tokenizer.ranks": b"abc 0\n" * 100})
    path = store.path_of(m, "tokenizer.ranks")
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="tokenizer.ranks.*sha256 mismatch"):
        store.read_bytes(m, "tokenizer.ranks")
    with pytest.raises(IntegrityError, match="tokenizer.ranks"):
        store.local_path(m, "tokenizer.ranks")
    assert store.verify(m)


def test_upstream_lineage_and_digest(tmp_path):
    store = Store(str(tmp_path))
    up = _commit(store, "tokenizer", "c" * 64)
    down = _commit(store, "base_train", "d" * 64, upstream={"tokenizer": up})
    assert down["upstream"] == {"tokenizer": {"key": "c" * 64, "digest": output_digest(up)}}
    same = _commit(store, "tokenizer", "e" * 64)
    assert output_digest(same) == output_digest(up)  # same bytes -> same identity for downstream


def test_listing_find_and_unfinished(tmp_path):
    store = Store(str(tmp_path))
    m = _commit(store, "data", "f" * 64)
    store.writer("data", "0" * 64).write_bytes("partial", b"x")
    assert [x["key"] for x in store.manifests()] == [m["key"]]
    assert store.find("ffffff")["key"] == m["key"]
    with pytest.raises(StoreError, match="no committed stage"):
        store.find("123456")
    assert [(s, d.rsplit("/", 1)[-1]) for s, d, _ in store.unfinished()] == [("data", "0" * 16)]


def test_bad_output_paths_rejected(tmp_path):
    w = Store(str(tmp_path)).writer("s", "1" * 64)
    for bad in ("../x", "/abs", "manifest.json", "_work/x", ""):
        with pytest.raises(StoreError, match="invalid output path"):
            w.write_bytes(bad, b"")


def test_manifest_of_another_key_is_rejected(tmp_path):
    store = Store(str(tmp_path))
    _commit(store, "s", "2" * 64)
    d = store.stage_dir("s", "2" * 64)
    m = json.load(open(f"{d}/manifest.json"))
    m["key"] = "3" * 64
    json.dump(m, open(f"{d}/manifest.json", "w"))
    with pytest.raises(IntegrityError, match="belongs to"):
        store.manifest("s", "2" * 64)


# ----- paths: the store and the local cache are laid out here only -----

def test_cache_paths_honour_nanopipe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPIPE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert download_cache("pypi") == tmp_path / "c" / "downloads" / "pypi"
    assert core_bundle_cache("eval_bundle") == tmp_path / "c" / "core" / "eval_bundle"
    assert Store().url == str(tmp_path / "c" / "store")
    mirror = mirror_cache("fineweb-edu", "https://a.example/x")
    assert mirror.parent == tmp_path / "c" / "downloads" / "fineweb-edu"
    assert mirror == mirror_cache("fineweb-edu", "https://a.example/x") != mirror_cache("fineweb-edu", "s3://b/x")
    assert download_cache("npm", tmp_path / "own") == tmp_path / "own" / "downloads" / "npm"  # a caller's own root
    monkeypatch.delenv("NANOPIPE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nanopipe"


def test_launch_log_paths_local_and_remote(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPIPE_CACHE", str(tmp_path / "c"))
    key = "ab" * 32
    local = Store(str(tmp_path / "store"))
    assert local.launch_log_path("sft", key) == f"{tmp_path}/store/sft/{key[:16]}/launch.log"
    assert local.local_launch_log("sft", key) == local.launch_log_path("sft", key)  # teed in place
    assert local.launch_spec_path("sft", key) == f"{tmp_path}/store/sft/{key[:16]}/_work/launch.json"
    remote = Store("memory://bucket/store")
    assert not remote.is_local
    assert remote.launch_log_path("sft", key) == f"/bucket/store/sft/{key[:16]}/launch.log"
    assert remote.local_launch_log("sft", key) == str(tmp_path / "c" / "logs" / "sft" / key[:16] / "launch.log")


def test_prefect_and_nightly_records(tmp_path):
    store, key = Store(str(tmp_path / "store")), "cd" * 32
    assert store.prefect_record("sft", key) == f"sft/{key[:16]}/_prefect_record.json"  # Prefect's cache key
    assert store.prefect_record_path("sft", key) == f"{store.stage_dir('sft', key)}/_prefect_record.json"
    assert store.nightly_records() == []
    for day in (3, 1, 2):
        path = store.nightly_record_path(dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc), f"run{day}-uuid")
        store.fs.makedirs(store.nightly_dir(), exist_ok=True)
        store.fs.pipe_file(path, b"{}")
    names = [posixpath.basename(p) for p in store.nightly_records()]
    assert names == [f"2026010{d}T000000000000Z-run{d}-uui.json" for d in (1, 2, 3)]  # oldest first
    assert store.stages() == []  # records are not stages
