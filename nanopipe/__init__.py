"""nanopipe: nanochat as resumable, schedulable pipeline infrastructure."""

__version__ = "0.1.0"
