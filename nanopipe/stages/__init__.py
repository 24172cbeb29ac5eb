"""Pipeline stages: the DAG, in run order, and which stages a run executes.

Each module in this package is one stage and follows the contract in nanopipe/runner.py.
This file is the only place that names the stages and their order. It imports nothing, so
library modules may read the DAG (``from nanopipe.stages import STAGES``) without loading any
stage (tests/test_layers.py holds every module to that).
"""

# name -> the upstream stages whose committed manifests it reads: the whole DAG in one place.
STAGES: dict[str, tuple[str, ...]] = {
    "setup": (),
    "tokenizer": (),
    "data": (),
    "base_train": ("tokenizer", "data"),
    "base_eval": ("tokenizer", "data", "base_train"),
    "mid_train": ("tokenizer", "base_train"),
    "sft": ("tokenizer", "mid_train"),
    "rl": ("tokenizer", "sft"),
    "serve": ("tokenizer", "sft"),
    "chat_eval": ("tokenizer", "mid_train", "sft"),
}
# The report reads every other stage's manifest.
STAGES["report"] = tuple(STAGES)


class PlanError(ValueError):
    """A stage name that is not in the DAG."""


def in_order(names) -> list[str]:
    """`names` in pipeline order; names that are not stages (say, from an older store) go last, by name."""
    names = set(names)
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def check_names(names: list[str] | tuple[str, ...] | None, what: str) -> None:
    unknown = [n for n in names or [] if n not in STAGES]
    if unknown:
        raise PlanError(f"unknown {what} {', '.join(map(repr, unknown))}; stages are: {', '.join(STAGES)}")


def plan_stages(stages: list[str] | None = None, force: list[str] | None = None) -> list[str]:
    """Requested and forced stages (default all) plus everything upstream of them, in pipeline order."""
    check_names(stages, "stage")
    check_names(force, "stage to force")
    wanted = set(stages or STAGES) | set(force or [])
    todo = list(wanted)
    while todo:
        for u in STAGES[todo.pop()]:
            if u not in wanted:
                wanted.add(u)
                todo.append(u)
    return [s for s in STAGES if s in wanted]
