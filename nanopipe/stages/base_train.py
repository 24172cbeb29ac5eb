"""Stage 4: base pretraining under torchrun; resumes from the newest complete checkpoint."""

from nanopipe.train.base import train as run

VERSION = 1
LAUNCH = "torchrun"
