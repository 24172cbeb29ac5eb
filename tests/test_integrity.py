"""Integrity you can ask for: `nanopipe verify`, damaged manifests, unwritable stores, atomic checkpoint
markers, shards verified once per process; and eval outputs whose bytes do not change on a rerun."""

import errno
import functools
import glob
import json
import os
import time

import pytest
import torch

from nanopipe import cli
from nanopipe.data.loader import DataLoader
from nanopipe.data.shards import shard_name, write_shard
from nanopipe.store import IntegrityError, Store, StoreError
from nanopipe.train.common import COMPLETE, Checkpoints, Dist, save_model


class Bytes:
    """A byte-level tokenizer: all the loader needs."""
    bos_id = 256

    def encode(self, texts, prepend=None):
        return [[prepend] + list(t.encode()) for t in texts]


def commit_data(store: Store, tmp_path, shards: int = 3) -> dict:
    """A committed data stage of real parquet shards (and a tokenizer stage beside it)."""
    w = store.writer("data", "d" * 64)
    for i in range(shards):
        local = str(tmp_path / f"s{i}.parquet")
        write_shard([f"shard {i} document {j} " * 20 for j in range(12)], local, row_group_size=4)
        w.put_file(local, shard_name("train", i))
    w.write_json("provenance.json", {"source": "test"})
    t = store.writer("tokenizer", "e" * 64)
    t.write_bytes("tokenizer.ranks", b"abc 0\n" * 50)
    t.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())
    return w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())


def flip(path: str, at: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if at is None else at] ^= 0x40
    open(path, "wb").write(bytes(data))


def nanopipe(*args) -> int:
    try:
        cli.main(list(args))
    except SystemExit as e:
        return e.code
    return 0


# ----- nanopipe verify -----

def test_verify_names_each_bad_file_and_exits_nonzero(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    m = commit_data(store, tmp_path)
    assert nanopipe("verify", "--store", store.url) == 0
    assert "verify: all 5 files" in capsys.readouterr().out

    flip(store.path_of(m, "train/shard_00001.parquet"))
    with open(store.path_of(m, "train/shard_00002.parquet"), "ab") as f:
        f.write(b"x")
    os.remove(store.path_of(m, "provenance.json"))
    assert nanopipe("verify", "--store", store.url) == 1
    out = capsys.readouterr().out.splitlines()
    d, entry = f"data/{'d' * 16}", {f["path"]: f for f in m["files"]}
    bad = sorted(line for line in out if line.startswith("BAD "))
    assert len(bad) == 3 and bad[0] == f"BAD {d}/provenance.json: missing"
    assert bad[1].startswith(f"BAD {d}/train/shard_00001.parquet: sha256 mismatch "
                             f"(manifest {entry['train/shard_00001.parquet']['sha256'][:12]}…, found ")
    size = entry["train/shard_00002.parquet"]["bytes"]
    assert bad[2] == f"BAD {d}/train/shard_00002.parquet: wrong size (manifest {size:,} B, found {size + 1:,} B)"
    assert out[-1].startswith("verify: 3 bad of 5 files")
    assert nanopipe("verify", "tokenizer", "--store", store.url) == 0  # STAGE names limit the check
    assert nanopipe("verify", "bogus", "--store", store.url) == 2


def test_verify_reports_a_damaged_manifest_as_a_bad_file(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    m = commit_data(store, tmp_path)
    path = f"{store.stage_dir('data', m['key'])}/manifest.json"
    open(path, "wb").write(open(path, "rb").read()[:200])  # truncated
    assert nanopipe("verify", "--store", store.url) == 1
    out = capsys.readouterr().out
    assert f"BAD data/{'d' * 16}/manifest.json: manifest is not valid JSON" in out
    assert "1 bad of 1 files" in out  # the tokenizer's file still checked


def test_verify_reports_progress_on_long_work(tmp_path):
    from nanopipe.verify import verify_store

    store = Store(str(tmp_path / "store"))
    w = store.writer("data", "d" * 64)
    for i in range(3):
        w.write_bytes(f"big{i}.bin", os.urandom(1 << 23))
    w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())
    seen = []
    v = verify_store(store, jobs=1, on_progress=lambda *p: seen.append(p), every_s=0.001)
    assert v.files == 3 and v.bytes == 3 << 23 and not v.bad
    assert seen and all(of == 3 and total == 3 << 23 and done <= total for _, of, done, total in seen)
    assert [done for _, _, done, _ in seen] == sorted(done for _, _, done, _ in seen)


# ----- damaged manifests: one line naming the file, whichever command meets them -----

def test_damaged_manifest_is_one_line_for_status_run_gc_and_artifacts(tmp_path, capsys):
    url = str(tmp_path / "store")
    other = ["--set", "setup.check_store=false"]
    assert nanopipe("stage", "setup", "--store", url) == 0
    assert nanopipe("stage", "setup", "--store", url, *other) == 0
    store = Store(url)
    damaged, intact = sorted(store.manifests("setup"), key=lambda m: m["config"]["check_store"], reverse=True)
    path = f"{store.stage_dir('setup', damaged['key'])}/manifest.json"
    open(path, "wb").write(open(path, "rb").read()[:100])
    capsys.readouterr()

    def one_line(code: int, *args) -> str:
        assert nanopipe(*args, "--store", url) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and path in err[0] and "not valid JSON" in err[0], err
        return err[0]

    one_line(2, "status")
    line = one_line(2, "run", "--no-prefect", "--stages", "setup,tokenizer")
    assert "--force setup" in line and store.stages() == ["setup"]  # before any work: no tokenizer was built
    one_line(2, "gc")
    one_line(2, "artifacts", "show", damaged["key"][:12])

    assert nanopipe("artifacts", "ls", "--store", url) == 1  # the others listed, the damaged one flagged
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("setup")] == [intact["key"][:16]]
    assert out[-1].startswith(f"BAD {path}: manifest is not valid JSON")
    assert store.find(intact["key"][:8])["key"] == intact["key"]

    assert nanopipe("run", "--no-prefect", "--stages", "setup", "--force", "setup", "--store", url) == 0  # the remedy
    assert store.manifest("setup", damaged["key"])["key"] == damaged["key"]


@pytest.mark.parametrize("content, problem", [
    (b"[1, 2]", "a JSON list, not an object"),
    (b'{"stage": "s", "key": "k"}', "'files' is missing"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_manifest_of_the_wrong_shape_is_an_integrity_error(tmp_path, content, problem):
    store = Store(str(tmp_path))
    w = store.writer("s", "1" * 64)
    w.write_bytes("x", b"x")
    w.commit(config={}, upstream={}, code_version="v1", metrics={}, started_at=0)
    open(f"{w.dir}/manifest.json", "wb").write(content)
    with pytest.raises(IntegrityError, match=f"s/{'1' * 16}/manifest.json: .*{problem}"):
        store.manifest("s", "1" * 64)
    with pytest.raises(IntegrityError, match=problem):
        store.manifests()
    bad = []
    assert store.manifests(bad=bad) == [] and bad[0][0].endswith("manifest.json")


# ----- a store that cannot be written -----

def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    """ENOSPC injected where a full disk reports it for a small write (fsync). This proves the error
    handling, not the OS: a real full tmpfs raises the same errno (mounting one needs privileges)."""
    url = str(tmp_path / "store")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert nanopipe("stage", "setup", "--store", url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0] and "env.json" in err[0], err
    assert not glob.glob(f"{url}/**/*.tmp", recursive=True) and not Store(url).manifests()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert nanopipe("stage", "setup", "--store", url) == 0  # space again: the rerun commits


def test_read_only_store_is_one_line(tmp_path, capsys, monkeypatch):
    """EROFS as os.makedirs raises it on a read-only mount (tests run as root, which ignores chmod)."""
    url = str(tmp_path / "store")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "makedirs", read_only)
    assert nanopipe("stage", "setup", "--store", url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0] and url in err[0], err


def test_object_store_refusing_writes_is_a_store_error(monkeypatch):
    store = Store(f"memory://np-{os.urandom(4).hex()}")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Access Denied")

    monkeypatch.setattr(store.fs, "pipe_file", denied)
    with pytest.raises(StoreError, match="cannot write memory://.*/manifest.json: permission denied"):
        store.atomic_put(f"{store.root}/s/manifest.json", b"{}")


# ----- checkpoints: COMPLETE is all or nothing -----

def test_checkpoint_complete_marker_is_written_atomically(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    ckpts = Checkpoints(store, f"{store.root}/s/0123456789abcdef/_work", keep=5)
    d = Dist(0, 0, 1, torch.device("cpu"))
    model = torch.nn.Linear(4, 4)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ckpts.save(d, 1, model, optimizers, {"step": 1})
    (src, dst), = [(s, t) for s, t in renames if t.endswith(COMPLETE)]
    assert dst == f"{ckpts._ckpt(1)}/{COMPLETE}" and src.startswith(dst + ".") and src.endswith(".tmp")

    def crash(src, dst):  # the process dies between writing the marker's bytes and renaming them
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpts.save(d, 2, model, optimizers, {"step": 2})
    assert os.listdir(ckpts._ckpt(2)) and COMPLETE not in os.listdir(ckpts._ckpt(2))
    assert not glob.glob(f"{ckpts._ckpt(2)}/*.tmp")
    assert ckpts.steps() == [1] and ckpts.load(d, 1, model, optimizers) == {"step": 1}
    open(f"{ckpts._ckpt(1)}/{COMPLETE}", "w").write('{"model.safetensors": "ab')  # damaged another way: refused by name
    with pytest.raises(IntegrityError, match=r"ckpt_000001/COMPLETE: not valid JSON"):
        ckpts.load(d, 1, model, optimizers)


# ----- weights: safetensors, read through the store's sha256 check; a model.pt of old is refused -----

def test_committed_weights_are_safetensors_and_an_old_model_pt_is_refused_by_name(tmp_path):
    import safetensors.torch
    from nanopipe import loading
    from test_engine import random_model

    store, model = Store(str(tmp_path / "store")), random_model()
    w = store.writer("sft", "a" * 64)
    save_model(w, model)
    m = w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())
    # plain safetensors that any tool reads: the exact tensors of the state dict
    saved = safetensors.torch.load_file(store.path_of(m, "model.safetensors"))
    assert saved.keys() == model.state_dict().keys() and all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    loaded = loading.load_model(store, m)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loading.find_model(store, "aaaaaa")["key"] == m["key"]
    flip(store.path_of(m, "model.safetensors"))
    with pytest.raises(IntegrityError, match=r"sft/a{16}/model\.safetensors: sha256 mismatch"):
        loading.load_model(store, m)

    w = store.writer("sft", "b" * 64)  # as nanopipe committed models before safetensors
    w.write_bytes("model.pt", b"a torch pickle")
    w.write_json("model_config.json", dict(model.config.__dict__))
    old = w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())
    for read in (lambda: loading.load_model(store, old), lambda: loading.find_model(store, "bbbbbb")):
        with pytest.raises(StoreError, match=r"sft/b{16} holds model\.pt, the weights format of nanopipe before "
                                             r"model\.safetensors; rebuild it"):
            read()


# ----- readers verify: shards (once per process), report results -----

def test_loader_verifies_each_shard_once_and_refuses_a_flipped_byte(tmp_path, monkeypatch):
    import nanopipe.store as store_mod

    store = Store(str(tmp_path / "store"))
    m = commit_data(store, tmp_path, shards=2)
    hashed = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda fs, path, *a: hashed.append(path) or real(fs, path, *a))
    rels = [shard_name("train", i) for i in range(2)]
    with DataLoader(rels, Bytes(), 4, 64, resolve=functools.partial(store.local_path, m)) as loader:
        for _ in range(60):  # several passes over both shards
            next(loader)
    assert sorted(hashed) == sorted(store.path_of(m, r) for r in rels)  # each once, not per row group

    flip(store.path_of(m, rels[1]))
    with pytest.raises(IntegrityError, match=r"train/shard_00001\.parquet: sha256 mismatch"):
        with DataLoader(rels, Bytes(), 4, 64, resolve=functools.partial(store.local_path, m)) as loader:
            for _ in range(60):
                next(loader)


def test_report_refuses_a_damaged_result_file(tmp_path):
    from nanopipe.report import build_report

    store = Store(str(tmp_path / "store"))
    w = store.writer("base_eval", "b" * 64)
    w.write_json("core.json", {"core": 0.25, "tasks": []})
    m = w.commit(config={}, upstream={}, code_version="test", metrics={"core": 0.25}, started_at=time.time())
    assert "| CORE | 0.2500 |" in build_report(store, {"base_eval": m}).markdown
    flip(store.path_of(m, "core.json"), at=3)
    with pytest.raises(IntegrityError, match=r"base_eval/b{16}/core\.json: sha256 mismatch"):
        build_report(store, {"base_eval": m})


# ----- outputs whose identity is their content -----

@pytest.mark.e2e
def test_serve_probe_file_is_the_same_on_a_rerun_and_timings_are_metrics(tmp_path):
    """The probe measures latency and throughput (metrics) and keeps the greedy replies (the file):
    a rerun, with other timings, commits the same bytes."""
    from nanopipe.config import ServeConfig
    from nanopipe.runner import execute
    from nanopipe.store import output_digest
    from conftest import commit_chat_model

    store = Store(str(tmp_path / "store"))
    ups = commit_chat_model(store)
    cfg = ServeConfig(max_tokens=12, concurrency=3)
    runs = []
    for _ in range(2):
        store.remove(store.stage_dir("serve", "c" * 64))
        runs.append(execute(store, "serve", "c" * 64, cfg, ups, log=lambda s: None))
    assert output_digest(runs[0]) == output_digest(runs[1])
    probe = json.loads(store.read_bytes(runs[1], "serve_probe.json"))
    assert probe["single"] and len(probe["concurrent"]) == 3 and "ttft_s" not in json.dumps(probe)
    assert runs[1]["metrics"]["ttft_ms"] > 0 and runs[1]["metrics"]["server"]["uptime_s"] >= 0

SMALL = ["tokenizer.vocab_size=512", "tokenizer.max_chars=400000", "tokenizer.heldout_docs=20",
         "data.source.max_chars=600000", "data.docs_per_shard=256", "data.row_group_size=64",
         "base_train.depth=1", "base_train.head_dim=32", "base_train.sequence_len=64", "base_train.device_batch_size=4",
         "base_train.total_batch_size=256", "base_train.num_iterations=2", "base_train.eval_every=0",
         "base_train.threads=1", "base_eval.eval_tokens=256", "base_eval.device_batch_size=4",
         "base_eval.core_max_examples=2", "base_eval.sample_tokens=4", "base_eval.threads=1"]


@pytest.mark.e2e
def test_forced_base_eval_leaves_the_report_cached(tmp_path, monkeypatch, capsys):
    """base_eval's files hold what it measured, not how fast: rebuilding it gives the same bytes, so
    the report downstream keeps its key (Cached). Also: verify names a shard with a flipped byte."""
    from nanopipe.config import load_config
    from nanopipe.runner import run_pipeline, stage_module
    from nanopipe.stages import STAGES
    from nanopipe.store import output_digest

    monkeypatch.setitem(STAGES, "report", ("base_eval",))  # the report of base_eval alone: the key in question
    for name in ("base_train", "base_eval"):  # in this process: the same stage code, without torchrun's start-up
        monkeypatch.setattr(stage_module(name), "LAUNCH", None)
    threads = torch.get_num_threads()
    store = Store(str(tmp_path / "store"))
    cfg = load_config("tiny", SMALL)
    order = ["tokenizer", "data", "base_train", "base_eval", "report"]
    first = run_pipeline(store, cfg, order, log=lambda s: None)
    again = run_pipeline(store, cfg, order, force=["base_eval"], log=lambda s: None)
    torch.set_num_threads(threads)
    assert not again["base_eval"][1] and again["report"][1], "base_eval was rebuilt and the report reused"
    assert output_digest(again["base_eval"][0]) == output_digest(first["base_eval"][0])
    assert again["report"][0]["key"] == first["report"][0]["key"]
    metrics = again["base_eval"][0]["metrics"]
    assert metrics["core_items_per_s"] > 0 and set(metrics["core_task_seconds"]) == {
        r["task"] for r in json.loads(store.read_bytes(again["base_eval"][0], "core.json"))["tasks"]}

    data = first["data"][0]
    flip(store.path_of(data, "train/shard_00000.parquet"))
    capsys.readouterr()
    assert nanopipe("verify", "--store", store.url) == 1
    out = capsys.readouterr().out
    assert f"BAD data/{data['key'][:16]}/train/shard_00000.parquet: sha256 mismatch" in out
    assert len([line for line in out.splitlines() if line.startswith("BAD")]) == 1
