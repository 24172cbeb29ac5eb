"""Weights & Biases tracking of training stages: optional, off unless `tracking.wandb_project` is set.

Rank 0 of a training stage (``train_loop``) starts one W&B run per stage key, logs every step's
metrics and every evaluation against the step, and finishes the run. The run id is the stage and
its key, so a stage resumed from a checkpoint continues its run. Offline mode
(``tracking.wandb_mode=offline`` or WANDB_MODE=offline) needs no account; ``wandb sync DIR``
uploads such a run later. wandb is an optional extra (``pip install 'nanopipe[wandb]'``); the
config refuses a project without it, before any work.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from nanopipe.store import wandb_dir

if TYPE_CHECKING:  # a type only: the config module is not part of the training stages' code identity
    from nanopipe.config import TrackingConfig


class Tracker:
    """One W&B run; log() takes any metrics and sends the finite numbers among them."""

    def __init__(self, run):
        self.run = run

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self.run.log(numbers, step=step)

    def finish(self, ok: bool = True) -> None:
        """End the run and wait until its data is written (finish() alone may return before)."""
        import wandb

        self.run.finish(exit_code=0 if ok else 1)
        wandb.teardown()


def start_tracking(cfg: "TrackingConfig | None", stage: str, key: str, config: dict) -> Tracker | None:
    """The W&B run of (stage, key) with the stage's config, or None when tracking is off."""
    if cfg is None or not cfg.wandb_project:
        return None
    import wandb

    where = cfg.wandb_dir or str(wandb_dir())
    os.makedirs(where, exist_ok=True)
    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode, dir=where,
                     id=f"{stage}-{key[:16]}", name=f"{stage} {key[:8]}", job_type=stage, resume="allow",
                     config={"stage": stage, "key": key, **config},
                     # The child's stdout carries its log and progress lines to the parent: leave it alone.
                     settings=wandb.Settings(console="off"))
    return Tracker(run)
