"""Stage 6: mid-training: teach the chat format, special tokens and tool calls (a packed stream).

The chat trainer (nanopipe.train.chat_sft) is this stage and sft alike: it continues the model
of the stage's upstream (base_train here; see STAGES) on the mixture its config section names.
"""

from nanopipe.train.chat_sft import train as run

VERSION = 1
LAUNCH = "torchrun"
