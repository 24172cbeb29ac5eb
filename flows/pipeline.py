"""The pipeline flow: the stages in DAG order, each a cached Prefect task; and one flow per stage.

`nanopipe run` calls `pipeline`; deployments (prefect.yaml) point at `pipeline` and at the
per-stage flows in STAGE_FLOWS (e.g. `flows/pipeline.py:stage_sft`), so "rerun SFT" is one
deployment run that reuses everything upstream.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from nanopipe.config import load_config
from nanopipe.dag import plan_stages
from nanopipe.stages import STAGES
from nanopipe.store import Store
from flows.cache import result_storage
from flows.stages import configured_task


@flow(name="pipeline", log_prints=True)
def pipeline(preset: str = "tiny", overrides: list[str] | None = None, stages: list[str] | None = None,
             force: list[str] | None = None, store: str | None = None) -> dict[str, dict]:
    """Run `stages` (default: all) and whatever they need upstream; reuse every stage already built."""
    logger = get_run_logger()
    cfg = load_config(preset, overrides or [])
    st = Store(store)
    order = plan_stages(stages, force)
    logger.info(f"store {st.url}; stages: {', '.join(order)}")
    storage = result_storage(st)
    futures: dict = {}
    for name in order:
        upstream = {u: futures[u] for u in STAGES[name]}
        futures[name] = configured_task(name, storage).submit(
            name, cfg.model_dump(mode="json"), upstream, st.url, name in (force or []))
    return {name: f.result() for name, f in futures.items()}


def task_states(flow_run_id) -> dict[str, str]:
    """Stage name -> final Prefect state name (Completed, Cached, Failed...) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state}


def stage_flow(stage: str):
    """A flow that (re)builds one stage, reusing everything upstream (deployable on its own)."""

    def one(preset: str = "tiny", overrides: list[str] | None = None, force: bool = False,
            store: str | None = None) -> dict:
        return pipeline.fn(preset, overrides, [stage], [stage] if force else [], store)[stage]

    one.__name__ = f"stage_{stage}"
    return flow(name=f"stage-{stage.replace('_', '-')}", log_prints=True)(one)


STAGE_FLOWS = {name: stage_flow(name) for name in STAGES}
globals().update({f"stage_{name}": f for name, f in STAGE_FLOWS.items()})  # importable entrypoints
