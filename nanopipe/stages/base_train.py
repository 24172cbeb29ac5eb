"""Stage 4: base pretraining under torchrun; resumes from the newest complete checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanopipe.train.base import train

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"


def run(ctx: "StageContext") -> dict:
    return train(ctx)
