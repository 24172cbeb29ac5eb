"""The stage contract end to end, through a real Prefect server: cache, resume, failures, S3."""

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import SMALL

from nanopipe.config import load_config
from nanopipe.runner import run_pipeline
from nanopipe.store import IntegrityError, Store

pytestmark = pytest.mark.e2e

UNTRAINED = ["setup", "tokenizer", "data"]  # the stages before training: quick to build


def env(**extra):
    return dict(os.environ, PYTHONPATH=os.getcwd(), **extra)


def run_flow(store_url, overrides=(), force=(), stages=UNTRAINED):
    from flows.pipeline import pipeline, task_states

    state = pipeline(preset="tiny", overrides=SMALL + list(overrides), stages=stages, force=list(force),
                     store=store_url, return_state=True)
    return state, task_states(state.state_details.flow_run_id)


@pytest.fixture
def count_runs(monkeypatch):
    """Counts executions of each stage body (not log lines)."""
    import nanopipe.runner as runner

    calls: dict[str, int] = {}
    real = runner.stage_module

    class Counted:
        def __init__(self, mod):
            self._mod = mod

        def __getattr__(self, name):
            if name == "run":
                def run(ctx):
                    calls[ctx.stage] = calls.get(ctx.stage, 0) + 1
                    return self._mod.run(ctx)
                return run
            return getattr(self._mod, name)

    monkeypatch.setattr(runner, "stage_module", lambda name: Counted(real(name)))
    return calls


def test_second_run_is_all_cached_and_config_change_reruns_only_that_stage(prefect_server, store_url, count_runs):
    state, states = run_flow(store_url)
    assert state.is_completed(), state.message
    assert states == {"setup": "Completed", "tokenizer": "Completed", "data": "Completed"}
    assert count_runs == {"setup": 1, "tokenizer": 1, "data": 1}

    state, states = run_flow(store_url)
    assert states == {"setup": "Cached", "tokenizer": "Cached", "data": "Cached"}
    assert count_runs == {"setup": 1, "tokenizer": 1, "data": 1}  # no stage work at all

    state, states = run_flow(store_url, ["data.docs_per_shard=300"])
    assert states == {"setup": "Cached", "tokenizer": "Cached", "data": "Completed"}
    assert count_runs == {"setup": 1, "tokenizer": 1, "data": 2}


def test_injected_failure_then_rerun_does_not_redo_tokenizer(prefect_server, store_url, count_runs, monkeypatch):
    monkeypatch.setenv("NANOPIPE_FAULTS", "data.shard=2:raise")
    state, states = run_flow(store_url)
    assert state.is_failed() and states["data"] == "Failed" and states["tokenizer"] == "Completed"
    monkeypatch.delenv("NANOPIPE_FAULTS")
    state, states = run_flow(store_url)
    assert state.is_completed(), state.message
    assert states["tokenizer"] == "Cached" and count_runs["tokenizer"] == 1
    data = state.result()["data"]["metrics"]
    assert data["shards_reused"] >= 2 and data["shards_reused"] + data["shards_written"] == data["train_shards"]


def test_sigkill_mid_data_then_rerun_writes_only_missing_shards(prefect_server, store_url):
    cmd = [sys.executable, "-m", "nanopipe", "stage", "data", "--store", store_url, *sum((["--set", o] for o in SMALL), [])]
    p = subprocess.run(cmd, env=env(NANOPIPE_FAULTS="data.shard=2:kill"), capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    store = Store(store_url)
    cfg = load_config("tiny", SMALL)
    from nanopipe.runner import compute_key

    key = compute_key(cfg, "data", {})
    shard_dir = store.stage_dir("data", key) + "/train"
    before = {path: info.get("mtime") or info.get("LastModified") for path, info in store.fs.find(shard_dir, detail=True).items()}
    assert len(before) >= 2 and store.manifest("data", key) is None
    state, states = run_flow(store_url, stages=["data"])
    assert state.is_completed(), state.message
    metrics = state.result()["data"]["metrics"]
    assert metrics["shards_reused"] == len(before)
    assert metrics["shards_written"] == metrics["train_shards"] - len(before) > 0
    after = {path: info.get("mtime") or info.get("LastModified") for path, info in store.fs.find(shard_dir, detail=True).items()}
    assert all(after[p] == before[p] for p in before)  # the shards that existed were not rewritten


def test_flipped_byte_in_committed_tokenizer_is_detected(tmp_path):
    store = Store(str(tmp_path / "store"))
    cfg = load_config("tiny", SMALL)
    m, _ = run_pipeline(store, cfg, ["tokenizer"], log=lambda s: None)["tokenizer"]
    path = store.path_of(m, "tokenizer.ranks")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x20
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=r"tokenizer\.ranks"):
        store.read_bytes(m, "tokenizer.ranks")


@pytest.mark.parametrize("args, needle", [
    (["run", "--set", "data.docs_per_shard=0"], "data.docs_per_shard"),
    (["run", "--set", "base_train.nope=1"], "no field 'nope'"),
    (["run", "--preset", "huge"], "unknown preset"),
    (["run", "--stages", "tokenizer,bogus"], "unknown stage 'bogus'"),
    (["run", "--force", "bogus"], "unknown stage to force 'bogus'"),
    (["stage", "bogus"], "unknown stage 'bogus'"),
])
def test_bad_input_is_one_line_exit_2_and_store_untouched(tmp_path, args, needle):
    store = tmp_path / "store"
    p = subprocess.run([sys.executable, "-m", "nanopipe", *args, "--store", str(store)], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not store.exists()


def test_torchrun_stages_of_one_process_run_one_at_a_time(prefect_server):
    """base_eval and mid_train both follow base_train: the flow may start them together, but they
    share this machine's devices, so device_slot lets one in at a time; other stages are not held."""
    from flows.stages import device_slot

    inside, most, order = [], [0], []
    lock = threading.Lock()

    def run(stage: str) -> None:
        with device_slot(stage):
            with lock:
                inside.append(stage)
                most[0] = max(most[0], len(inside))
            time.sleep(0.3)
            with lock:
                inside.remove(stage)
                order.append(stage)

    with device_slot("base_eval"):  # a torchrun stage holds the slot: a CPU stage still runs
        t = threading.Thread(target=run, args=("tokenizer",))
        t.start()
        t.join(timeout=5)
        assert order == ["tokenizer"]
    threads = [threading.Thread(target=run, args=(s,)) for s in ("base_eval", "mid_train", "sft")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(order[1:]) == ["base_eval", "mid_train", "sft"] and most[0] == 1
