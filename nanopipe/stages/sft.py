"""Stage 7: supervised fine-tuning on curated conversations (padded rows, as at inference).

The chat trainer (nanopipe.train.chat_sft) is this stage and mid_train alike: it continues the
model of the stage's upstream (mid_train here; see STAGES) on the mixture its config section names.
"""

from nanopipe.train.chat_sft import train as run

VERSION = 1
LAUNCH = "torchrun"
