"""The keys of the Prefect artifacts nanopipe publishes, and the way back from a key to its stage.

flows/ publishes each stage's artifacts under ``artifact_key(stage, kind)`` (e.g. `data-summary`,
`base-train-metrics`) and the nightly eval under NIGHTLY_KEYS; `nanopipe artifacts show` takes the
same keys (``stage_of``), so what the UI shows can be looked up from a shell. No Prefect here.
"""

from __future__ import annotations

from nanopipe.stages import STAGES

# What a stage publishes: summary (markdown), metrics (table), store (link to its dir), table (a result
# table it commits), progress and live (while a training stage runs).
KINDS = ("summary", "metrics", "store", "table", "progress", "live")
NIGHTLY_TABLE = "nightly-eval-table"  # one row per (stage, metric) of the newest nightly eval
NIGHTLY_SUMMARY = "nightly-eval-summary"  # its regressions, as markdown
NIGHTLY_KEYS = (NIGHTLY_TABLE, NIGHTLY_SUMMARY)


def artifact_key(stage: str, kind: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes; grouped by stage."""
    return f"{stage.replace('_', '-')}-{kind}"


def stage_of(key: str) -> str | None:
    """The stage whose artifact `key` is (`base-train-metrics` -> base_train), or None."""
    for stage in STAGES:
        for kind in KINDS:
            if key == artifact_key(stage, kind):
                return stage
    return None
