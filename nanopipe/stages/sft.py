"""Stage 7: supervised fine-tuning on curated conversations (padded rows, as at inference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanopipe.train.chat_sft import train

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"


def run(ctx: "StageContext") -> dict:
    return train(ctx, parent="mid_train")
