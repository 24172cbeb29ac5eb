"""nanopipe: nanochat as resumable, schedulable pipeline infrastructure."""
import os

__version__ = "0.1.0"

# Set to 1 (the test suite does), every process importing nanopipe checks its collectives as
# NCCL would, on any backend (nanopipe/distcheck.py).
STRICT_COLLECTIVES_ENV = "NANOPIPE_STRICT_COLLECTIVES"
if os.environ.get(STRICT_COLLECTIVES_ENV) == "1":
    from nanopipe import distcheck

    distcheck.install()
