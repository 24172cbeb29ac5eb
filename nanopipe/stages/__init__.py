"""Pipeline stages: the DAG, in run order. Each module follows the contract in nanopipe/runner.py.

STAGES is the only list of the stages and their order; the code that reads it is nanopipe/dag.py.
This file holds data only and imports nothing, so any module may read the DAG without loading a
stage (tests/test_layers.py holds every module to that).
"""

# name -> the upstream stages whose committed manifests it reads: the whole DAG in one place.
STAGES: dict[str, tuple[str, ...]] = {
    "setup": (),
    "tokenizer": (),
    "data": (),
    "base_train": ("tokenizer", "data"),
    "base_eval": ("tokenizer", "data", "base_train"),
    "mid_train": ("tokenizer", "base_train"),
    "sft": ("tokenizer", "mid_train"),
    "rl": ("tokenizer", "sft"),
    "serve": ("tokenizer", "sft"),
    "chat_eval": ("tokenizer", "mid_train", "sft"),
    # the newest chat model (export.model) as a Hugging Face directory; its card quotes the evaluations
    "export": ("tokenizer", "base_eval", "sft", "rl", "chat_eval"),
}
# The report reads every other stage's manifest.
STAGES["report"] = tuple(STAGES)
