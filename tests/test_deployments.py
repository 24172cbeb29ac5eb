"""Deployments through a real Prefect server: `prefect deploy --all`, workers on the cpu and gpu
pools, runs triggered through the API as the UI's Run button does, the nightly eval, `nanopipe ui`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (LONG_TRAIN, SMALL, TRAIN, checkpoint_steps, ps, resumed_at, stage_dir, stage_processes,
                      wait_for)

from nanopipe.eval.nightly import compare, lower_is_better
from nanopipe.config import PRESETS
from nanopipe.stages import STAGES
from nanopipe.store import Store

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "core"
RUN_TIMEOUT_S = 300


def dashed(stage: str) -> str:
    return stage.replace("_", "-")


# ----- unit: the nightly regression rule -----

def record(**metrics_by_stage):
    return {"results": {s: {"key": s[0] * 64, "metrics": m} for s, m in metrics_by_stage.items()}}


def test_compare_flags_only_moves_the_wrong_way_beyond_the_threshold():
    prev = record(base_train={"val_bpb": 1.00, "core": 0.20, "core/copa": 0.5}, sft={"chat/mmlu": 0.30})
    now = record(base_train={"val_bpb": 1.05, "core": 0.19, "core/copa": 0.6, "core/piqa": 0.4},
                 sft={"chat/mmlu": 0.25}, rl={"chat/gsm8k": 0.1})
    rows = {(r["stage"], r["metric"]): r for r in compare(now, prev, threshold=0.02)}
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {("base_train", "val_bpb"): "REGRESSION",  # bpb up by 0.05
                      ("base_train", "core"): "ok",  # down by 0.01, within the threshold
                      ("base_train", "core/copa"): "improved",
                      ("base_train", "core/piqa"): "new",
                      ("sft", "chat/mmlu"): "REGRESSION",  # a score down by 0.05
                      ("rl", "chat/gsm8k"): "new"}
    assert rows[("base_train", "val_bpb")]["delta"] == pytest.approx(0.05)
    assert rows[("base_train", "val_bpb")]["previous"] == 1.0
    assert all(r["status"] == "new" and r["previous"] is None for r in compare(now, None, 0.02))
    assert lower_is_better("val_bpb") and lower_is_better("val_loss") and not lower_is_better("core")


def test_a_change_within_noise_is_not_a_regression():
    """Accuracy at n examples has a standard error of about sqrt(p(1-p)/n): 0.30 -> 0.25 on 50 items
    is noise, the same move on 5000 items is not."""
    from nanopipe.eval.nightly import accuracy_stderr

    def at(acc: float, n: int) -> dict:
        return {"results": {"sft": {"key": "s" * 64, "metrics": {"chat/mmlu": acc},
                                    "stderr": {"chat/mmlu": accuracy_stderr(acc, n)}}}}

    (row,) = compare(at(0.25, 50), at(0.30, 50), threshold=0.02)
    assert row["status"] == "ok" and row["noise"] > 0.05 and row["stderr"] == pytest.approx(0.0618, abs=1e-3)
    (row,) = compare(at(0.25, 5000), at(0.30, 5000), threshold=0.02)
    assert row["status"] == "REGRESSION" and row["noise"] < 0.02
    assert accuracy_stderr(1.0, 10) > 0  # 10/10 is not certainty


def test_standard_errors_of_centered_scores_and_bits_per_byte():
    from nanopipe.eval.nightly import accuracy_stderr, centered_stderr, ratio_stderr

    tasks = {"a": {"accuracy": 0.5, "n": 100, "random_baseline": 25.0}, "b": {"accuracy": 0.5, "n": 100,
                                                                              "random_baseline": 0.0}}
    se_a = accuracy_stderr(0.5, 100) / 0.75
    se_b = accuracy_stderr(0.5, 100)
    assert centered_stderr(tasks, lambda r: 0.01 * r["random_baseline"]) == pytest.approx((se_a ** 2 + se_b ** 2) ** 0.5 / 2)
    assert ratio_stderr([1.0], [10]) is None
    assert ratio_stderr([1.0, 1.0, 1.0], [5, 10, 20]) == 0.0
    assert ratio_stderr([0.9, 1.1], [10, 10]) == pytest.approx(0.1, rel=1e-6)


def test_a_new_setting_or_new_code_starts_a_new_baseline_and_says_why():
    from nanopipe.eval.nightly import baseline

    code = {"version": "c1", "modules": {"nanopipe.eval.core": "x"}}
    settings = {"max_examples": 200, "device": "cpu"}
    old = {"created_at": "night 1", "settings": settings, "code": code}
    newer = {"created_at": "night 2", "settings": {**settings, "max_examples": 100}, "code": code}
    assert baseline([], settings, code) == (None, "new baseline: the first recorded run")
    assert baseline([old, newer], settings, code)[0] is old  # the newest run measured the same way
    rec, said = baseline([old], {**settings, "max_examples": 50}, code)
    assert rec is None and said.startswith("new baseline") and "max_examples 200 -> 50" in said
    rec, said = baseline([old], settings, {"version": "c2", "modules": {"nanopipe.eval.core": "y"}})
    assert rec is None and "code: nanopipe.eval.core changed" in said


def test_prefect_yaml_deploys_every_stage_on_the_right_pool():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["entrypoint"]: d for d in spec["deployments"]}
    assert spec["build"] is None and spec["push"] is None
    assert list(spec["pull"][0]) == ["prefect.deployments.steps.set_working_directory"]
    for stage in STAGES:
        d = deps[f"flows/pipeline.py:stage_{stage}"]
        assert d["name"] == dashed(stage)
        launch = getattr(__import__(f"nanopipe.stages.{stage}", fromlist=["x"]), "LAUNCH", None)
        if launch == "torchrun":  # training and evaluation run on GPU hosts
            assert d["work_pool"]["name"] == "gpu", stage
    stage_deps = [e for e in deps if e.startswith("flows/pipeline.py:stage_")]
    assert len(stage_deps) == len(STAGES)  # no deployment of a stage that does not exist
    assert deps["flows/pipeline.py:pipeline"]["work_pool"]["name"] == "gpu"
    assert deps["flows/nightly_eval.py:nightly_eval"]["schedules"][0]["cron"]


# ----- against the session's Prefect server, with workers -----

def write_core_bundle(root: Path, labels=("arc_easy", "copa", "jeopardy")) -> str:
    """A CORE bundle directory (the published layout) holding the fixture items of a few tasks."""
    from nanopipe.eval.core import CORE_TASK_SPECS

    tasks = json.loads((FIXTURES / "tasks.json").read_text(encoding="utf-8"))
    spec = {s.label: s for s in CORE_TASK_SPECS}
    icl, meta = [], "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
    for label in labels:
        t, path = tasks[label], root / "eval_data" / spec[label].dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(it) + "\n" for it in t["items"]), encoding="utf-8")
        icl.append({"label": label, "dataset_uri": spec[label].dataset_uri, "num_fewshot": [t["num_fewshot"]],
                    "icl_task_type": t["task_type"], "continuation_delimiter": t["continuation_delimiter"]})
        meta += f"{label},x,y,0,0,{t['random_baseline']},,\n"
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}))
    (root / "eval_meta_data.csv").write_text(meta)
    return str(root)


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """pools.yaml applied (with this module's store), `prefect deploy --all`, a worker per pool."""
    from flows.ui import apply_pools, deploy, start_worker, stop

    store_url = str(tmp_path_factory.mktemp("deploy") / "store")
    logs = tmp_path_factory.mktemp("worker-logs")
    spec = apply_pools(prefect_server, store=store_url)
    deploy(prefect_server, logs / "deploy.log")
    with client() as c:
        nightly = c.read_deployment_by_name("nightly-eval/eval")
        # Paused after reading its schedule, so no scheduled run can land in the middle of the tests.
        c.pause_deployment(nightly.id)
    workers = [start_worker(pool, prefect_server, logs, PYTHONPATH=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="1",
                            PREFECT_LOGGING_LEVEL="INFO") for pool in spec["pools"]]
    yield {"api": prefect_server, "store": store_url, "logs": logs, "nightly_schedules": nightly.schedules}
    stop(workers)


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run(deployment: str, deployed, **parameters):
    """Trigger a deployment through the API (the UI's Run button) and wait for a worker to finish it."""
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, timeout=RUN_TIMEOUT_S)
    if not fr.state.is_final():
        logs = "\n".join(p.read_text()[-3000:] for p in deployed["logs"].glob("worker-*.log"))
        pytest.fail(f"{deployment} not finished after {RUN_TIMEOUT_S}s ({fr.state.name}); workers:\n{logs}")
    return fr


def task_states(flow_run_id) -> dict[str, str]:
    from flows.pipeline import task_states as states

    return states(flow_run_id)


def latest_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client() as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


@pytest.mark.e2e
def test_deploy_all_registers_deployments_pools_limit_and_schedule(deployed):
    expected = {"pipeline/full", "nightly-eval/eval"} | {f"stage-{dashed(s)}/{dashed(s)}" for s in STAGES}
    with client() as c:
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        pools = {p.name: p for p in c.read_work_pools()}
        limit = c.read_global_concurrency_limit_by_name("gpu")
    assert expected <= set(deps)
    assert {"cpu", "gpu"} <= set(pools) and all(pools[p].type == "process" for p in ("cpu", "gpu"))
    # The pools give every flow run the store given to `apply_pools` (job variable `env`).
    env_default = pools["cpu"].base_job_template["variables"]["properties"]["env"]["default"]
    assert env_default["NANOPIPE_STORE"] == deployed["store"]
    assert limit.limit == 1
    full = deps["pipeline/full"]
    assert full.work_pool_name == "gpu" and deps["stage-base-train/base-train"].work_pool_name == "gpu"
    assert deps["stage-tokenizer/tokenizer"].work_pool_name == "cpu"
    # What the UI's run form edits: the flow's parameters, with the flow's own defaults (not restated
    # per deployment), a description for each, and choices for preset and stages.
    props = full.parameter_openapi_schema["properties"]
    assert set(props) == {"preset", "overrides", "stages", "force", "store"}
    assert props["preset"]["enum"] == list(PRESETS) and props["preset"]["default"] == "tiny"
    assert props["stages"]["anyOf"][0]["items"]["enum"] == list(STAGES) == props["force"]["anyOf"][0]["items"]["enum"]
    assert "base_train.depth=4" in props["overrides"]["description"]
    for name, dep in deps.items():
        assert dep.parameters == {}, name
        for param, spec in dep.parameter_openapi_schema["properties"].items():
            assert len(spec.get("description", "")) > 20, f"{name}: {param} has no description"
    assert deps["stage-sft/sft"].parameter_openapi_schema["properties"]["force"]["default"] is False
    assert deps["nightly-eval/eval"].parameter_openapi_schema["properties"]["device"]["enum"] == ["auto", "cpu", "cuda"]
    assert full.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    schedules = deployed["nightly_schedules"]  # as deployed
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in schedules] == [("0 3 * * *", "UTC", True)]


@pytest.fixture(scope="module")
def pipeline_run(deployed):
    return run("pipeline/full", deployed, preset="tiny", overrides=SMALL, stages=["setup", "tokenizer", "data"],
               force=[])


@pytest.mark.e2e
def test_pipeline_deployment_runs_end_to_end_on_a_worker(deployed, pipeline_run):
    assert pipeline_run.state.is_completed(), pipeline_run.state.message
    assert task_states(pipeline_run.id) == {"setup": "Completed", "tokenizer": "Completed", "data": "Completed"}
    assert pipeline_run.work_pool_name == "gpu"
    store = Store(deployed["store"])  # the pool's NANOPIPE_STORE reached the flow run
    assert {m["stage"] for m in store.manifests()} == {"setup", "tokenizer", "data"}
    # Artifacts under the documented keys: <stage>-summary / -metrics / -store.
    for stage in ("setup", "tokenizer", "data"):
        for kind in ("summary", "metrics", "store"):
            art = latest_artifact(f"{stage}-{kind}")
            assert art is not None and art.flow_run_id == pipeline_run.id, f"{stage}-{kind}"
    metrics = {row["metric"]: row["value"] for row in json.loads(latest_artifact("tokenizer-metrics").data)}
    assert metrics["vocab_size"] == 512


@pytest.fixture(scope="module")
def trained(deployed, pipeline_run):
    return run("stage-base-train/base-train", deployed, preset="tiny", overrides=SMALL + TRAIN, force=False)


@pytest.mark.e2e
def test_single_stage_deployment_reuses_upstream(deployed, trained):
    assert trained.state.is_completed(), trained.state.message
    assert task_states(trained.id) == {"tokenizer": "Cached", "data": "Cached", "base_train": "Completed"}
    (m,) = Store(deployed["store"]).manifests("base_train")
    assert m["metrics"]["steps"] == 8 and latest_artifact("base-train-summary").flow_run_id == trained.id


@pytest.mark.e2e
def test_nightly_eval_publishes_table_and_flags_regressions(deployed, trained, tmp_path, monkeypatch):
    import flows.nightly_eval as nightly_flow
    from flows.nightly_eval import nightly_eval

    params = dict(max_examples=2, core_source=write_core_bundle(tmp_path / "core"), bpb_tokens=512, batch_size=4,
                  chat=False, threshold=0.02)
    first = run("nightly-eval/eval", deployed, **params)
    assert first.state.is_completed(), first.state.message
    rows = json.loads(latest_artifact("nightly-eval-table").data)
    assert {r["metric"] for r in rows} == {"val_bpb", "core", "core/arc_easy", "core/copa", "core/jeopardy"}
    assert {r["stage"] for r in rows} == {"base_train"} and {r["status"] for r in rows} == {"new"}

    # Pretend the previous night was better: tonight's same checkpoint must show as a regression.
    store = Store(deployed["store"])
    (path,) = store.fs.ls(store.nightly_dir(), detail=False)
    prev = json.loads(store.fs.cat_file(path))
    prev["results"]["base_train"]["metrics"]["val_bpb"] -= 0.5
    store.fs.pipe_file(path, json.dumps(prev).encode())
    state = nightly_eval(store=deployed["store"], fail_on_regression=True, return_state=True, **params)
    assert state.is_failed() and "base_train/val_bpb" in state.message
    rows = {r["metric"]: r for r in json.loads(latest_artifact("nightly-eval-table").data)}
    assert rows["val_bpb"]["status"] == "REGRESSION"
    assert rows["val_bpb"]["delta"] == pytest.approx(0.5, abs=1e-4)
    assert rows["core"]["status"] == "ok"  # the same checkpoint scores the same
    assert "1 regression" in latest_artifact("nightly-eval-summary").data
    assert len(store.fs.ls(store.nightly_dir(), detail=False)) == 2

    # Other settings measure differently: a new baseline, said so, and nothing called a regression.
    # Evaluating is device work: it holds the `gpu` slot like the training stages.
    slots, evaluate = [], nightly_flow.evaluate_checkpoint
    monkeypatch.setattr(nightly_flow, "evaluate_checkpoint",
                        lambda *a, **k: slots.append(gpu_slots_in_use()) or evaluate(*a, **k))
    out = nightly_eval(store=deployed["store"], fail_on_regression=True, **{**params, "max_examples": 3})
    assert out["compared"].startswith("new baseline") and "max_examples 2 -> 3" in out["compared"]
    assert {r["status"] for r in out["rows"]} == {"new"}
    assert "new baseline" in latest_artifact("nightly-eval-summary").data
    assert slots == [1]


@pytest.mark.e2e
def test_report_is_published_as_a_markdown_artifact(deployed, trained, monkeypatch):
    """The report stage over what this module built (upstream narrowed to those stages)."""
    from flows.pipeline import pipeline

    monkeypatch.setitem(STAGES, "report", ("setup", "tokenizer", "data", "base_train"))
    state = pipeline(preset="tiny", overrides=SMALL + TRAIN, stages=["report"], store=deployed["store"],
                     return_state=True)
    assert state.is_completed(), state.message
    assert task_states(state.state_details.flow_run_id)["base_train"] == "Cached"
    art = latest_artifact("report-summary")
    assert art.flow_run_id == state.state_details.flow_run_id
    assert art.data.startswith("# nanopipe report") and "| CORE | - | - | - | - |" in art.data
    assert art.data.count("](data:image/png;base64,") == 1  # base_train's loss curve, inlined


# ----- Cancel cancels; a killed engine leaves nothing behind -----

def start(deployment: str, **parameters):
    """Trigger a deployment through the API and return at once (the UI's Run button)."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, timeout=0)


def flow_state(flow_run_id):
    with client() as c:
        return c.read_flow_run(flow_run_id).state


def gpu_slots_in_use() -> int:
    with client() as c:
        return c.read_global_concurrency_limit_by_name("gpu").active_slots


def cancel(flow_run_id) -> None:
    """What Cancel in the UI does."""
    from prefect.states import Cancelling

    with client() as c:
        c.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the test"), force=True)


def training_midway(deployed, overrides):
    """Start stage-base-train with `overrides` and wait for its first checkpoint and its three processes."""
    fr = start("stage-base-train/base-train", overrides=overrides)
    d = wait_for(lambda: stage_dir(deployed["store"], overrides, "base_train"), RUN_TIMEOUT_S, "the upstream stages")
    step = wait_for(lambda: checkpoint_steps(d), RUN_TIMEOUT_S, "base_train's first checkpoint")[-1]
    procs = wait_for(lambda: (p := stage_processes(deployed["store"])) and len(p) == 3 and p, 30, "torchrun and 2 ranks")
    return fr, d, step, procs


def gone_within(deployed, seconds: float, what: str) -> float:
    t0 = time.monotonic()
    wait_for(lambda: not stage_processes(deployed["store"]), seconds, f"no torchrun or rank left after {what}")
    return time.monotonic() - t0


def rerun_resumes_then_cancel(deployed, overrides, d, step) -> None:
    rerun = start("stage-base-train/base-train", overrides=overrides)
    wait_for(lambda: resumed_at(d) is not None, RUN_TIMEOUT_S, "the rerun to resume from a checkpoint")
    assert resumed_at(d) >= step
    cancel(rerun.id)
    gone_within(deployed, 30, "cancelling the rerun")
    wait_for(lambda: flow_state(rerun.id).is_final(), 120, "the cancelled rerun to end")


@pytest.mark.e2e
def test_cancel_through_the_api_stops_every_rank_frees_the_slot_and_the_rerun_resumes(deployed, pipeline_run):
    overrides = SMALL + LONG_TRAIN
    fr, d, step, procs = training_midway(deployed, overrides)
    print(f"\nbefore Cancel (flow run {fr.id}, checkpoint at step {step}):\n{ps(procs)}")
    assert gpu_slots_in_use() == 1
    cancel(fr.id)
    took = gone_within(deployed, 30, "Cancel")
    print(f"{took:.1f}s after Cancel:\n{ps(stage_processes(deployed['store']))}")
    state = wait_for(lambda: (s := flow_state(fr.id)).is_final() and s, 120, "the cancelled run to end")
    assert state.is_cancelled(), state
    assert task_states(fr.id)["base_train"] == "Cancelled"
    wait_for(lambda: gpu_slots_in_use() == 0, 30, "the gpu slot to be released")
    rerun_resumes_then_cancel(deployed, overrides, d, step)


@pytest.mark.e2e
def test_sigkill_of_the_flow_engine_leaves_no_rank_and_the_slot_comes_back(deployed, pipeline_run):
    """A killed engine runs no cleanup: its children die with it (PR_SET_PDEATHSIG), and the worker,
    seeing it crash, releases the `gpu` slot it held (the run's on_crashed hook; on a real server
    the lease would also expire within a minute and a quarter)."""
    overrides = SMALL + LONG_TRAIN + ["base_train.checkpoint_every=12"]  # its own key: its own checkpoints
    fr, d, step, procs = training_midway(deployed, overrides)
    with client() as c:
        engine = int(c.read_flow_run(fr.id).infrastructure_pid.rsplit(":", 1)[-1])
    print(f"\nbefore SIGKILL of the engine (pid {engine}):\n{ps([engine, *procs])}")
    os.kill(engine, signal.SIGKILL)
    took = gone_within(deployed, 10, "the engine's SIGKILL")
    print(f"{took:.1f}s after:\n{ps([p for p in [engine, *procs] if _alive(p)])}")
    state = wait_for(lambda: (s := flow_state(fr.id)).is_final() and s, 120, "the worker to see the engine die")
    assert state.is_crashed(), state
    wait_for(lambda: gpu_slots_in_use() == 0, 60, "the dead engine's gpu slot to come back")
    rerun_resumes_then_cancel(deployed, overrides, d, step)


# ----- `nanopipe ui` on a fresh machine -----

@pytest.mark.e2e
def test_ui_starts_server_pools_deployments_workers_and_stops_them_all(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))  # fresh SQLite database
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.ui", "--port", str(port), "--store", str(tmp_path / "store")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, children = [], []
    from flows.ui import healthy
    from nanopipe.launch import descendants

    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("Prefect UI:"):
                break
        children = descendants(proc.pid)
        assert out and out[-1].strip() == f"Prefect UI: http://127.0.0.1:{port}", "".join(out)

        api = f"http://127.0.0.1:{port}/api"
        assert healthy(api)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), client() as c:
            assert {"cpu", "gpu"} <= {p.name for p in c.read_work_pools()}
            assert len(c.read_deployments()) == len(STAGES) + 2
            deadline = time.monotonic() + 60  # workers register with their first poll

            def polling():
                return all(c.read_workers_for_work_pool(pool) for pool in ("cpu", "gpu"))

            while not polling() and time.monotonic() < deadline:
                time.sleep(1)
            assert polling(), "no worker polled both pools within 60s"
        children = descendants(proc.pid)
        assert len(children) >= 3  # the server and a worker per pool
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped." in rest
        alive = [pid for pid in children if _alive(pid)]
        assert alive == [], f"still running after stop: {alive}"
        assert not healthy(api)
    finally:
        if proc.poll() is None:  # the test failed before a clean stop: let the ui stop its children
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in children + descendants(proc.pid):
                    _kill(pid)
                proc.kill()
                proc.wait()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; only its parent's wait is missing.
    try:
        return not re.search(r"^State:\s+Z", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return False
