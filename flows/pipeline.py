"""The pipeline flow: the stages in DAG order, each a cached Prefect task; and one flow per stage.

`nanopipe run` calls `pipeline`; deployments (prefect.yaml) point at `pipeline` and at the
per-stage flows in STAGE_FLOWS (e.g. `flows/pipeline.py:stage_sft`), so "rerun SFT" is one
deployment run that reuses everything upstream.

The run form in the UI is built from these signatures and docstrings: `preset` and `stages` are
choices (Literal types made from PRESETS and STAGES), every parameter has a description (the
"Args:" of the docstring; HELP below), and the defaults are the flows' own (prefect.yaml does not
restate them).
"""

from __future__ import annotations

import time
from typing import Literal, Union

import httpx
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from nanopipe.config import PRESETS, load_config
from nanopipe.dag import plan_stages, upstream_of
from nanopipe.stages import STAGES
from nanopipe.store import Store
from flows.cache import result_storage
from flows.stages import configured_task, release_dead_leases, stop_launched, stop_launched_on_cancel

Preset = Literal[tuple(PRESETS)]  # the run form's choices
Stage = Literal[tuple(STAGES)]

HELP = {
    "preset": f"The configuration to build: {', '.join(PRESETS)}. tiny: CPU, offline data, minutes; cpu: about "
              "an hour on CPU; d20: nanochat's 561M model on 8 GPUs; d26, d32: larger.",
    "overrides": "Config values to change, each `section.field=value` (a JSON value), e.g. "
                 "`base_train.depth=4`, `base_train.num_iterations=200`, `data.num_shards=4`, "
                 "`sft.device_batch_size=8`. Empty: the preset as it is. A bad value fails before any work, "
                 "naming the field.",
    "stages": "The stages to run (and whatever they need upstream). Empty: all. Built stages are reused (Cached).",
    "force": "Stages to rebuild even though they are built; downstream reruns only if their output changes.",
    "force_one": "Rebuild the stage even though it is built (from scratch: its resume state is dropped).",
    "store": "Where stage outputs live: a path, `s3://bucket/prefix` or any fsspec URL. Empty: the worker's "
             "$NANOPIPE_STORE (set per pool with `nanopipe ui --store URL`), else ~/.cache/nanopipe/store.",
}


def args_doc(summary: str, **names: str) -> str:
    """A Google-style docstring (Prefect reads its "Args:" into the run form's descriptions)."""
    return summary + "\n\nArgs:\n" + "".join(f"    {name}: {HELP[key]}\n" for name, key in names.items())


def run_stages(preset: str, overrides: list[str] | None, stages: list[str] | None, force: list[str] | None,
               store: str | None) -> Union[dict[str, dict], State]:
    """Submit every planned stage at once (dependants wait in Prefect for their upstream), wait for
    all, and return the manifests; a run where a stage failed or was cancelled returns its state,
    with one line saying which stage and why (the stage's own log holds the one traceback)."""
    logger = get_run_logger()
    cfg = load_config(preset, overrides or [])
    st = Store(store)
    order = plan_stages(stages, force)
    logger.info(f"store {st.url}; stages: {', '.join(order)}")
    storage = result_storage(st)
    futures: dict = {}
    with stop_launched_on_cancel(flow_run.get_id()):
        for name in order:
            upstream = {u: futures[u] for u in STAGES[name]}
            futures[name] = configured_task(name, storage).submit(
                name, cfg.model_dump(mode="json"), upstream, st.url, name in (force or []))
        with get_client(sync_client=True) as client:
            for name, f in futures.items():
                when_recorded(lambda: client.set_task_run_name(f.task_run_id, name))
        for f in futures.values():
            f.wait()
    states = {name: f.state for name, f in futures.items()}
    if all(s.is_completed() for s in states.values()):
        return {name: f.result() for name, f in futures.items()}
    failed = [n for n in order if states[n].is_failed() or states[n].is_crashed()]
    cancelled = [n for n in order if states[n].is_cancelled()]
    not_run = settle_not_run(futures, states, failed + cancelled)
    said = "; ".join([f"{n} failed: {first_line(states[n].message)}" for n in failed]
                     + ([f"cancelled: {', '.join(cancelled)}"] if cancelled else [])
                     + ([f"not run: {', '.join(not_run)}"] if not_run else []))
    return Failed(message=said) if failed else Cancelled(message=said)


def first_line(message: str | None, width: int = 300) -> str:
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else "no message"
    return line if len(line) <= width else line[:width] + " ..."


def settle_not_run(futures: dict, states: dict, stopped: list[str]) -> list[str]:
    """Stages that never ran because an upstream stage failed or was cancelled are left Pending
    (NotReady) by Prefect, their bars growing in the UI after the run ended: set them Cancelled,
    naming the upstream stage. Returns their names."""
    not_run = [n for n, s in states.items() if not s.is_final()]
    with get_client(sync_client=True) as client:
        for name in not_run:
            culprit = next((u for u in stopped if u in upstream_of(name)), "an upstream stage")
            state = Cancelled(message=f"not run: upstream {culprit} did not complete")
            when_recorded(lambda: client.set_task_run_state(futures[name].task_run_id, state, force=True))
            when_recorded(lambda: client.set_task_run_name(futures[name].task_run_id, name))
    return not_run


def when_recorded(call, wait_s: float = 15.0) -> None:
    """call() (an update of a task run), retried while the server has not yet recorded the task run
    (its engine reports it through events, a moment after it is submitted); given up after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            call()
            return
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 404 or time.monotonic() > deadline:
                return  # only the names and states of the UI are at stake here: never fail the run for them
            time.sleep(0.2)



def _pipeline(preset: Preset = "tiny", overrides: list[str] | None = None, stages: list[Stage] | None = None,
              force: list[Stage] | None = None, store: str | None = None) -> dict[str, dict]:
    return run_stages(preset, overrides, stages, force, store)


_pipeline.__doc__ = args_doc("Run the stages (default: all) and whatever they need upstream; reuse every stage "
                             "already built.", preset="preset", overrides="overrides", stages="stages",
                             force="force", store="store")
# One thread per stage: every stage's task run exists (Pending, named after its stage) from the start.
pipeline = flow(name="pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=len(STAGES)),
                on_cancellation=[stop_launched], on_crashed=[stop_launched, release_dead_leases])(_pipeline)


def task_states(flow_run_id) -> dict[str, str]:
    """Stage name -> final Prefect state name (Completed, Cached, Failed...) of one flow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state}


def stage_flow(stage: str):
    """A flow that (re)builds one stage, reusing everything upstream (deployable on its own)."""

    def one(preset: Preset = "tiny", overrides: list[str] | None = None, force: bool = False,
            store: str | None = None) -> dict:
        out = run_stages(preset, overrides, [stage], [stage] if force else [], store)
        return out if isinstance(out, State) else out[stage]

    one.__name__ = f"stage_{stage}"
    one.__doc__ = args_doc(f"Build the {stage} stage, reusing (or first building) what it needs upstream.",
                           preset="preset", overrides="overrides", force="force_one", store="store")
    return flow(name=f"stage-{stage.replace('_', '-')}", log_prints=True,
                task_runner=ThreadPoolTaskRunner(max_workers=len(STAGES)),
                on_cancellation=[stop_launched], on_crashed=[stop_launched, release_dead_leases])(one)


STAGE_FLOWS = {name: stage_flow(name) for name in STAGES}
globals().update({f"stage_{name}": f for name, f in STAGE_FLOWS.items()})  # importable entrypoints
