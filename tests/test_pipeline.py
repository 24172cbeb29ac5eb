"""The stage contract end to end, through a real Prefect server: cache, resume, failures, S3."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import LONG_TRAIN, SMALL, checkpoint_steps, ps, resumed_at, sets, stage_dir, stage_processes, wait_for

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


def test_a_failed_stage_leaves_its_dependants_cancelled_and_says_so_once(prefect_server, tmp_path, monkeypatch):
    """Stages that cannot run because an upstream failed end Cancelled (not Pending, bars growing),
    named after their stage; the run's message is one line; the failure's traceback is logged once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    monkeypatch.setenv("NANOPIPE_FAULTS", "data.shard=2:raise")
    state, states = run_flow(str(tmp_path / "store"), stages=["base_train"])
    assert state.is_failed() and states == {"tokenizer": "Completed", "data": "Failed", "base_train": "Cancelled"}
    assert len(state.message.splitlines()) == 1
    assert state.message.startswith("data failed: ") and "injected fault at data.shard" in state.message
    assert state.message.endswith("not run: base_train")
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        (base_train,) = [r for r in client.read_task_runs() if r.flow_run_id == flow_run_id and r.name == "base_train"]
        assert base_train.state.message == "not run: upstream data did not complete"

        def tracebacks() -> int:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return sum(log.message.count("Traceback (most recent call last)") for log in logs)

        wait_for(tracebacks, 30, "the failure's traceback in the run's logs")
        time.sleep(3)  # logs are shipped in batches: a second traceback would be there by now
        assert tracebacks() == 1


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


def test_sigkill_of_a_no_prefect_run_group_leaves_no_rank_and_the_rerun_resumes(tmp_path):
    """torchrun and its ranks sit in sessions of their own, so a group kill does not reach them: they
    die with their parent (PR_SET_PDEATHSIG), and the rerun resumes from the newest checkpoint."""
    url = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "nanopipe", "run", "--no-prefect", "--stages", "base_train", "--store", url,
           *sets(SMALL + LONG_TRAIN)]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "stderr.log", "a"))

    def resumed(run: subprocess.Popen) -> bool:
        assert run.poll() is None, f"the rerun ended (exit {run.returncode}): {(tmp_path / 'stderr.log').read_text()[-3000:]}"
        return resumed_at(stage_dir(url, SMALL + LONG_TRAIN, "base_train")) is not None

    def kill_group(run: subprocess.Popen) -> None:
        before = stage_processes(url)
        assert len(before) == 3, ps(before)  # torchrun and two ranks
        print(f"before SIGKILL of the process group of `nanopipe run` (pid {run.pid}):\n{ps(before)}")
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        wait_for(lambda: not stage_processes(url), 10, "torchrun and its ranks to die with their parent")
        print(f"after:\n{ps(stage_processes(url))}")

    first = start()
    try:
        step = wait_for(lambda: checkpoint_steps(stage_dir(url, SMALL + LONG_TRAIN, "base_train")), 600,
                        "base_train's first checkpoint")[-1]
        kill_group(first)
        second = start()  # the rerun: starts at once (nothing holds the stage), resumes
        try:
            wait_for(lambda: resumed(second), 600, "the rerun to resume")
            assert resumed_at(stage_dir(url, SMALL + LONG_TRAIN, "base_train")) >= step
            kill_group(second)
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


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


def test_device_work_of_one_process_runs_one_at_a_time_and_says_it_waits(prefect_server):
    """base_eval and mid_train both follow base_train: the flow may start them together, but they
    share this machine's devices, so device_slot lets one in at a time, and the others say so."""
    from flows.stages import device_slot, uses_device

    assert uses_device("base_eval") and uses_device("mid_train") and not uses_device("tokenizer")
    inside, most, order, said = [], [0], [], []
    lock = threading.Lock()

    def run(stage: str) -> None:
        with device_slot(stage, said.append):
            with lock:
                inside.append(stage)
                most[0] = max(most[0], len(inside))
            time.sleep(0.3)
            with lock:
                inside.remove(stage)
                order.append(stage)

    threads = [threading.Thread(target=run, args=(s,)) for s in ("base_eval", "mid_train", "sft")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(order) == ["base_eval", "mid_train", "sft"] and most[0] == 1
    assert len(said) == 2 and all("waiting for this process's device: " in line and " is using it" in line
                                  for line in said), said


def test_a_stage_waiting_for_the_gpu_slot_says_so(prefect_server):
    """The global `gpu` limit (one slot here) is held by another holder: the stage waits, saying for what."""
    from prefect.client.orchestration import get_client

    from flows.stages import GPU_LIMIT, _gpu_slot

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, 1)
    said, got = [], threading.Event()

    def second() -> None:
        with _gpu_slot("mid_train", said.append):
            got.set()

    with _gpu_slot("base_train", said.append):
        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not got.is_set()
    t.join(timeout=60)
    assert got.is_set()
    assert said and said[0].startswith(f"[mid_train] waiting for a slot of the global concurrency limit '{GPU_LIMIT}' "
                                       "(1 of 1 slots in use)"), said
