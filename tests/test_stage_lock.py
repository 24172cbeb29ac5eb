"""One run of a stage key at a time, and what the CLI says about a stage that runs: the stage lock,
the ranks' lock, `status` (running, with progress), `gc` (what it keeps and why), `artifacts show`."""

import fcntl
import json
import threading
import time

import pytest
from conftest import SMALL, TRAIN, wait_for

from nanopipe import cli
from nanopipe.config import load_config
from nanopipe.runner import _flock, compute_key, execute, launch_child, run_stage, running, stage_lock
from nanopipe.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def commit_fake(store, cfg, stage: str, upstream: dict) -> dict:
    """A committed manifest of `stage` at the key `cfg` gives it (one small file): cheap upstream."""
    w = store.writer(stage, compute_key(cfg, stage, upstream))
    w.write_bytes("out.txt", stage.encode())
    return w.commit(config={}, upstream=upstream, code_version="test", metrics={"x": 1}, started_at=time.time())


def test_a_second_run_waits_for_the_first_says_for_what_and_reuses_its_output(store):
    cfg = load_config("tiny", SMALL)
    key = compute_key(cfg, "setup", {})
    said, done = [], {}
    with stage_lock(store, "setup", key):
        assert running(store, "setup", key)["pid"] > 0
        second = threading.Thread(target=lambda: done.update(r=run_stage(store, cfg, "setup", {}, log=said.append)))
        second.start()
        wait_for(lambda: said, 30, "the second run to say that it waits")
        assert said[0].startswith(f"[setup] waiting: another run of setup/{key[:16]} (pid ") and \
            store.lock_path("setup", key) in said[0], said
        time.sleep(1)
        assert "r" not in done  # still waiting
        first = execute(store, "setup", key, cfg.setup, {}, log=lambda s: None)  # the first run commits
    second.join(60)
    manifest, reused = done["r"]
    assert reused and manifest["key"] == first["key"] and "another run built it while this one waited" in said[-1]
    assert running(store, "setup", key) is None


def test_a_launch_waits_for_ranks_of_an_earlier_run(store, monkeypatch):
    """Ranks hold the ranks' lock (shared) while they work: a new launch starts none while one lives."""
    import nanopipe.runner as runner

    cfg = load_config("tiny", SMALL + TRAIN)
    key = "f" * 64
    launched, said = threading.Event(), []

    def fake_run_streaming(cmd, log_path, on_line, env):
        launched.set()
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner, "run_streaming", fake_run_streaming)
    path = store.rank_lock_path("base_train", key)
    with _flock(path, fcntl.LOCK_SH, print, lambda: "unused"):  # a rank of an earlier run, still alive
        assert running(store, "base_train", key) == {}  # only ranks are left
        t = threading.Thread(target=lambda: pytest.raises(RuntimeError, launch_child, store, cfg, "base_train", key,
                                                          {}, said.append))
        t.start()
        wait_for(lambda: said, 30, "the launch to say that it waits")
        assert "ranks of an earlier run of base_train/ffffffffffffffff are still alive" in said[0]
        assert not launched.is_set()
    t.join(60)
    assert launched.is_set()


def test_status_shows_a_running_stage_with_its_progress_and_gc_keeps_it(store, capsys):
    cfg = load_config("tiny", SMALL + TRAIN)
    ups = {s: commit_fake(store, cfg, s, {}) for s in ("tokenizer", "data")}
    key = compute_key(cfg, "base_train", ups)
    overrides = [x for o in SMALL + TRAIN for x in ("--set", o)]
    store.fs.makedirs(store.work_dir("base_train", key), exist_ok=True)  # its dir, no manifest yet
    with stage_lock(store, "base_train", key):
        row = {r["stage"]: r for r in cli.config_status(store, cfg)}["base_train"]
        assert row["running"]["holder"]["stage"] == "base_train" and row["running"]["progress"] is None
        store.fs.pipe_file(store.progress_path("base_train", key), json.dumps(
            {"stage": "base_train", "key": key, "step": 12, "total": 60, "percent": 20.0, "eta_s": 90.0,
             "elapsed_s": 20.0, "metrics": {"loss": 5.1}, "updated_at": "2026-01-01T00:00:00+00:00"}).encode())
        cli.main(["status", "--store", store.url, *overrides])
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "base_train" in x)
        assert line.split()[:3] == ["running", "base_train", key[:16]]
        assert "step 12/60 (20%), ETA 1m30s, pid " in line
        cli.main(["gc", "--store", store.url, "--min-age", "0", "--yes", *overrides])
        out = capsys.readouterr().out
        assert f"keeping {store.stage_dir('base_train', key)}  (unfinished, running (" in out
        assert f"keeping {store.stage_dir('data', ups['data']['key'])}  (built for preset tiny (this config))" in out
        assert store.fs.exists(store.stage_dir("base_train", key))
    row = {r["stage"]: r for r in cli.config_status(store, cfg)}["base_train"]
    assert row["running"] is None  # the lock is free: a dir with progress but no live run is not running


def test_artifacts_show_takes_a_stage_a_key_prefix_or_a_prefect_artifact_key(store, capsys):
    cfg = load_config("tiny", SMALL)
    m = commit_fake(store, cfg, "data", {})
    for name in ("data", "data-summary", "data-metrics", m["key"][:8], f"data/{m['key'][:16]}"):
        cli.main(["artifacts", "show", name, "--store", store.url, *[x for o in SMALL for x in ("--set", o)]])
        out = capsys.readouterr().out
        assert json.loads(out.split("files:")[0])["key"] == m["key"], name
    with pytest.raises(SystemExit) as e:  # built, but not for this config
        cli.main(["artifacts", "show", "base-train-metrics", "--store", store.url])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "base_train is not built for preset tiny" in err
    with pytest.raises(SystemExit):
        cli.main(["artifacts", "show", "data", "--store", store.url])  # another config: not built for it
    err = capsys.readouterr().err
    assert f"the newest data in the store is data/{m['key'][:16]}" in err and len(err.strip().splitlines()) == 1


def test_artifacts_help_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["artifacts", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{ls,show} ls list every committed stage output (damaged manifests flagged) " \
           "show one stage output: manifest, files, lineage" in text
