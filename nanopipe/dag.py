"""Reading the stage DAG (nanopipe.stages.STAGES): pipeline order, and which stages a run executes.

The DAG itself is data in nanopipe/stages/__init__.py; the code that reads it lives here, in an
ordinary library module, so that it is part of the code identity of the stages that use it
(the stage registry is not: a stage's key covers its upstream through their output identities).
"""

from __future__ import annotations

from collections.abc import Iterable

from nanopipe.stages import STAGES


class PlanError(ValueError):
    """A stage name that is not in the DAG."""


def in_order(names: Iterable[str]) -> list[str]:
    """`names` in pipeline order; names that are not stages (say, from an older store) go last, by name."""
    names = set(names)
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def check_names(names: list[str] | tuple[str, ...] | None, what: str) -> None:
    unknown = [n for n in names or [] if n not in STAGES]
    if unknown:
        raise PlanError(f"unknown {what} {', '.join(map(repr, unknown))}; stages are: {', '.join(STAGES)}")


def upstream_of(stage: str) -> set[str]:
    """Every stage `stage` needs, directly or not."""
    found, todo = set(), list(STAGES[stage])
    while todo:
        u = todo.pop()
        if u not in found:
            found.add(u)
            todo.extend(STAGES[u])
    return found


def plan_stages(stages: list[str] | None = None, force: list[str] | None = None) -> list[str]:
    """Requested and forced stages (default all) plus everything upstream of them, in pipeline order."""
    check_names(stages, "stage")
    check_names(force, "stage to force")
    wanted = set(stages or STAGES) | set(force or [])
    return in_order(wanted.union(*(upstream_of(s) for s in wanted)))
