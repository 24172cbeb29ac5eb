"""Stage 6: mid-training: teach the chat format, special tokens and tool calls (packed stream)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanopipe.train.chat_sft import train

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1
LAUNCH = "torchrun"


def run(ctx: "StageContext") -> dict:
    return train(ctx, parent="base_train")
