"""
The CORE metric (DCLM, arXiv:2406.11794), scored the way nanochat's core_eval does.

Every task is in-context learning scored by likelihood, never by generation:
- multiple_choice: one query, several continuations (`choices`); the model picks the
  continuation with the lowest mean loss over its tokens.
- schema: several contexts (`context_options`), one shared `continuation`; the model
  picks the context under which the continuation has the lowest mean loss.
- language_modeling: `context` + `continuation`; correct iff greedy argmax predictions
  reproduce every continuation token.
Ties go to the first option (argmin), as in nanochat.

Prompts: `num_fewshot` examples, drawn from the task's other items with
random.Random(1234 + idx), are rendered before the item exactly as nanochat renders
them (render_prompts). The items are first shuffled with random.Random(1337) and cut to
max_examples, so a subset is a fixed random sample and few-shot draws match nanochat's.
A prompt longer than the model's max_seq_len is cropped from the left.

Each task's accuracy is centered against its random baseline (in percent, from
eval_meta_data.csv): centered = (acc - b/100) / (1 - b/100), so chance scores 0 and a
perfect model 1. CORE is the mean centered score over the tasks.
"""

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat: order of the items before max_examples is applied
FEWSHOT_SEED = 1234  # nanochat: random.Random(FEWSHOT_SEED + idx) draws item idx's examples
ITEMS_PER_CHUNK = 256  # items tokenized at once; batches are packed within a chunk


@dataclass(frozen=True)
class CoreTaskSpec:
    """A CORE task as DCLM's core.yaml and eval_meta_data.csv define it (random_baseline in percent)."""

    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float


_MC, _SCHEMA, _LM = TASK_TYPES
_ANSWER = "\nAnswer: "
# The 22 tasks of CORE, in core.yaml's order. missing_tasks is reported against this list.
CORE_TASK_SPECS = (
    CoreTaskSpec("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", _MC, 0, " ", 25),
    CoreTaskSpec("jeopardy", "world_knowledge/jeopardy_all.jsonl", _LM, 10, _ANSWER, 0),
    CoreTaskSpec("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", _LM, 10, " ", 0),
    CoreTaskSpec("arc_easy", "world_knowledge/arc_easy.jsonl", _MC, 10, _ANSWER, 25),
    CoreTaskSpec("arc_challenge", "world_knowledge/arc_challenge.jsonl", _MC, 10, _ANSWER, 25),
    CoreTaskSpec("copa", "commonsense_reasoning/copa.jsonl", _MC, 0, " ", 50),
    CoreTaskSpec("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", _MC, 10, " ", 20),
    CoreTaskSpec("piqa", "commonsense_reasoning/piqa.jsonl", _MC, 10, _ANSWER, 50),
    CoreTaskSpec("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", _MC, 0, " ", 25),
    CoreTaskSpec("lambada_openai", "language_understanding/lambada_openai.jsonl", _LM, 0, " ", 0),
    CoreTaskSpec("hellaswag", "language_understanding/hellaswag.jsonl", _MC, 10, " ", 25),
    CoreTaskSpec("winograd", "language_understanding/winograd_wsc.jsonl", _SCHEMA, 0, " ", 50),
    CoreTaskSpec("winogrande", "language_understanding/winogrande.jsonl", _SCHEMA, 0, " ", 50),
    CoreTaskSpec("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", _LM, 10, " ", 0),
    CoreTaskSpec("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", _MC, 3, " ", 20),
    CoreTaskSpec("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", _LM, 10, " ", 0),
    CoreTaskSpec("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", _LM, 10, " ", 0),
    CoreTaskSpec("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl",
                 _LM, 10, " ", 0),
    CoreTaskSpec("squad", "reading_comprehension/squad.jsonl", _LM, 10, " ", 0),
    CoreTaskSpec("coqa", "reading_comprehension/coqa.jsonl", _LM, 0, " ", 0),
    CoreTaskSpec("boolq", "reading_comprehension/boolq.jsonl", _MC, 10, _ANSWER, 62),
    CoreTaskSpec("bigbench_language_identification",
                 "language_understanding/bigbench_language_identification.jsonl", _MC, 10, " ", 9.1),
)
CORE_LABELS = tuple(s.label for s in CORE_TASK_SPECS)

_REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass
class CoreTask:
    """One CORE task: how to prompt and score it, and its items.

    items: dicts in the eval bundle's JSONL format, by task_type:
        multiple_choice   {"query": str, "choices": [str, ...], "gold": int}
        schema            {"context_options": [str, ...], "continuation": str, "gold": int}
        language_modeling {"context": str, "continuation": str}
    random_baseline: accuracy of guessing, in percent (eval_meta_data.csv's "Random baseline").
    source: where the items came from ("eval_bundle", "offline", ...), for reports.
    """

    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float
    items: list = field(repr=False)
    source: str = ""

    def __post_init__(self):
        where = f"CORE task {self.label!r}"
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"{where}: task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ValueError(f"{where}: num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if not isinstance(self.continuation_delimiter, str):
            raise ValueError(f"{where}: continuation_delimiter must be a string, got {self.continuation_delimiter!r}")
        if not isinstance(self.random_baseline, (int, float)) or not 0 <= self.random_baseline < 100:
            raise ValueError(f"{where}: random_baseline must be a percentage in [0, 100), got {self.random_baseline!r}")
        if not self.items:
            raise ValueError(f"{where}: has no items")
        for i, item in enumerate(self.items):
            problem = _item_problem(self.task_type, item)
            if problem:
                raise ValueError(f"{where}: item {i}: {problem}")


def _item_problem(task_type: str, item) -> str | None:
    if not isinstance(item, dict):
        return f"expected a dict, got {type(item).__name__}"
    missing = [k for k in _REQUIRED_FIELDS[task_type] if k not in item]
    if missing:
        return f"missing {missing} (a {task_type} item needs {list(_REQUIRED_FIELDS[task_type])})"
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    if options_key is not None:
        options = item[options_key]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            return f"{options_key} must be a list of at least 2 strings"
        gold = item["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            return f"gold must be an index into the {len(options)} options, got {gold!r}"
    for key in ("query", "context", "continuation"):
        if key in _REQUIRED_FIELDS[task_type] and not isinstance(item[key], str):
            return f"{key} must be a string"
    if task_type != "multiple_choice" and not item["continuation"].strip():
        return "continuation is empty"
    return None


# -----------------------------------------------------------------------------
# Prompts (the strings nanochat's jinja templates produce)

def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """The prompts to score for `item`, after its few-shot examples (each followed by a blank line).

    multiple_choice: one full prompt per choice; schema: one per context option;
    language_modeling: [prompt without the continuation (stripped), prompt with it].
    """
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        # contexts are trimmed (some carry trailing whitespace), and the prompt without the
        # continuation is stripped so its tokens stay a clean prefix of the full prompt's
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{item['context'].strip()}{delimiter}"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task_type {task_type!r}; expected one of {TASK_TYPES}")


class _AllBut(Sequence):
    """range(n) without `skip`, without building the list (random.sample needs only len and indexing)."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self):
        return self.n - 1

    def __getitem__(self, j):
        if not 0 <= j < self.n - 1:
            raise IndexError(j)
        return j if j < self.skip else j + 1


def fewshot_indices(n_items: int, idx: int, k: int) -> list[int]:
    """nanochat's draw: random.Random(1234 + idx).sample(all indices but idx, k).

    k is capped at n_items - 1 (nanochat would fail when a task has fewer items than shots).
    """
    k = min(k, n_items - 1)
    if k <= 0:
        return []
    return random.Random(FEWSHOT_SEED + idx).sample(_AllBut(n_items, idx), k)


def task_items(task: CoreTask, max_examples: int | None = None) -> list[dict]:
    """The task's items in evaluation order: shuffled with a fixed seed, then cut to max_examples."""
    items = list(task.items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items if max_examples is None else items[:max_examples]


def item_prompts(task: CoreTask, items: Sequence[dict], idx: int) -> list[str]:
    """The rendered prompts of items[idx], with its few-shot examples drawn from `items`."""
    shots = [items[j] for j in fewshot_indices(len(items), idx, task.num_fewshot)]
    return render_prompts(task.task_type, items[idx], task.continuation_delimiter, shots)


# -----------------------------------------------------------------------------
# Token spans

def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def scored_spans(task_type: str, token_seqs: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences to run, start, end): tokens [start, end) of each sequence are the ones scored.

    Every sequence starts with BOS, so start >= 1 and the token before a span always exists.
    """
    if task_type == "multiple_choice":
        # same context, different continuations: score what follows the common prefix, but at
        # least one token per option (a choice may tokenize as a prefix of another)
        start = min(_common_prefix(token_seqs), min(len(s) for s in token_seqs) - 1)
        return token_seqs, [start] * len(token_seqs), [len(s) for s in token_seqs]
    if task_type == "schema":
        # different contexts, same continuation: score the common suffix (leaving BOS unscored)
        suffix = min(_common_suffix(token_seqs), min(len(s) for s in token_seqs) - 1)
        return token_seqs, [len(s) - suffix for s in token_seqs], [len(s) for s in token_seqs]
    if task_type == "language_modeling":
        without, with_ = token_seqs
        # the prompt without the continuation should tokenize as a prefix of the full one; if a
        # token straddles the boundary, score from where the two first differ
        start = len(without) if with_[:len(without)] == without else _common_prefix([without, with_])
        start = max(1, min(start, len(with_) - 1))
        return [with_], [start], [len(with_)]
    raise ValueError(f"unknown task_type {task_type!r}")


def crop_left(seqs: list[list[int]], starts: list[int], ends: list[int], max_len: int):
    """Keep the last max_len tokens of each sequence, shifting its span with it.

    A span longer than the window keeps what fits (its first token needs the one before it).
    """
    out = ([], [], [])
    for seq, s, e in zip(seqs, starts, ends):
        cut = max(0, len(seq) - max_len)
        out[0].append(seq[cut:])
        out[1].append(max(1, s - cut))
        out[2].append(e - cut)
    return out


# -----------------------------------------------------------------------------
# Scoring

@dataclass
class _Entry:
    """One item, tokenized: its sequences (one per option, one for LM) and their scored spans."""

    task_type: str
    gold: int
    seqs: list
    starts: list
    ends: list

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.seqs)


def _entry(task: CoreTask, item: dict, token_seqs: list[list[int]], max_seq_len: int) -> _Entry:
    seqs, starts, ends = scored_spans(task.task_type, token_seqs)
    seqs, starts, ends = crop_left(seqs, starts, ends, max_seq_len)
    return _Entry(task.task_type, item.get("gold", 0), seqs, starts, ends)


def _pack(entries: list[_Entry], batch_size: int) -> list[list[_Entry]]:
    """Group entries into forward passes of at most batch_size sequences (an item never splits).

    Sorted by length first, so sequences of similar length share a pass and padding stays small.
    """
    batches, current, rows = [], [], 0
    for e in sorted(entries, key=lambda e: e.max_len):
        if current and rows + len(e.seqs) > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(e)
        rows += len(e.seqs)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _score(logits_fn, entries: list[_Entry], pad_id: int, device) -> list[bool]:
    """Run one forward pass over all sequences of `entries`; return each entry's correctness."""
    seqs = [s for e in entries for s in e.seqs]
    starts = [s for e in entries for s in e.starts]
    ends = [x for e in entries for x in e.ends]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    rows, pos = [], []  # per scored token: its row, and the position whose logits predict it
    for r, (seq, s, e) in enumerate(zip(seqs, starts, ends)):
        ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        rows += [r] * (e - s)
        pos += range(s - 1, e - 1)  # logits at position t predict token t + 1
    ids = ids.to(device)
    logits = logits_fn(ids)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (len(seqs), T):
        raise ValueError(f"CORE: logits_fn returned shape {tuple(logits.shape)}, expected ({len(seqs)}, {T}, vocab)")
    rows_t = torch.tensor(rows, device=device)
    pos_t = torch.tensor(pos, device=device)
    targets = ids[rows_t, pos_t + 1]
    picked = logits[rows_t, pos_t].float()  # only the scored positions: (n_tokens, V)
    token_loss = -torch.log_softmax(picked, dim=-1).gather(1, targets[:, None]).squeeze(1)
    token_ok = picked.argmax(dim=-1) == targets
    loss_sum = torch.zeros(len(seqs), dtype=torch.float64, device=device).index_add_(0, rows_t, token_loss.double())
    n_bad = torch.zeros(len(seqs), dtype=torch.long, device=device).index_add_(0, rows_t, (~token_ok).long())
    counts = torch.tensor([e - s for s, e in zip(starts, ends)], dtype=torch.float64)
    mean_loss = (loss_sum.cpu() / counts).tolist()
    n_bad = n_bad.cpu().tolist()

    results, r = [], 0
    for e in entries:
        k = len(e.seqs)
        if e.task_type == "language_modeling":
            results.append(n_bad[r] == 0)
        else:
            losses = mean_loss[r:r + k]
            results.append(losses.index(min(losses)) == e.gold)  # first option wins ties
        r += k
    return results


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(logits_fn: Callable, tokenizer, task: CoreTask, max_seq_len: int, device,
                  max_examples: int | None = None, batch_size: int = 8,
                  progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """(number correct, number evaluated) for this rank's share of the task's items.

    Rank r of W takes items r, r+W, ... (after shuffling and max_examples); sums over ranks
    give the task's totals. progress(done, total) is called after every forward pass.
    """
    items = task_items(task, max_examples)
    rank, world = _dist_info()
    mine = list(range(rank, len(items), world))
    correct, done = 0, 0
    for c in range(0, len(mine), ITEMS_PER_CHUNK):
        chunk = mine[c:c + ITEMS_PER_CHUNK]
        prompts = [item_prompts(task, items, i) for i in chunk]
        flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=tokenizer.bos_id)
        entries, k = [], 0
        for i, ps in zip(chunk, prompts):
            entries.append(_entry(task, items[i], flat[k:k + len(ps)], max_seq_len))
            k += len(ps)
        for batch in _pack(entries, batch_size):
            correct += sum(_score(logits_fn, batch, tokenizer.bos_id, device))
            done += len(batch)
            if progress is not None:
                progress(done, len(mine))
    return correct, done


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so guessing scores 0 and a perfect model 1 (baseline in percent)."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def evaluate_core(logits_fn: Callable, tokenizer, tasks: Sequence[CoreTask], max_seq_len: int, device,
                  max_examples: int | dict | None = None, batch_size: int = 8,
                  log: Callable[[str], None] | None = print, log_every_s: float = 30.0) -> dict:
    """Score `tasks` and return CORE.

    logits_fn: idx LongTensor (B, T) on `device` -> logits (B, T, V); a nanopipe GPT works as is.
    tokenizer: anything with encode(list[str], prepend=int) -> list[list[int]] and bos_id.
    max_seq_len: longest sequence logits_fn accepts; longer prompts are cropped from the left.
    max_examples: items per task (an int for all, or {label: int}); None = all.
    batch_size: most sequences per forward pass; an item's options always share one pass.
    log: receives progress and result lines (rank 0 only); None = silent.

    Returns {"core": mean centered score, "core_name": "CORE" (the published bundle's 22 tasks: comparable
    with nanochat's) or e.g. "CORE (20/22 tasks, offline substitute)",
    "tasks": {label: {"accuracy", "centered", "n", "random_baseline", "seconds", "items_per_s"}},
    "missing_tasks": CORE labels not among `tasks`, "items_per_s": overall throughput}.
    Under torch.distributed, ranks split the items and every rank returns the same totals.
    """
    if not tasks:
        raise ValueError("evaluate_core: no tasks given")
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluate_core: duplicate task labels in {labels}")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"evaluate_core: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_core: batch_size must be an integer >= 1, got {batch_size!r}")
    caps = max_examples if isinstance(max_examples, dict) else {t.label: max_examples for t in tasks}
    unknown = set(caps) - set(labels)
    if unknown:
        raise ValueError(f"evaluate_core: max_examples names tasks that are not given: {sorted(unknown)}")
    for label, cap in caps.items():
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"evaluate_core: max_examples for {label!r} must be None or an integer >= 1, got {cap!r}")

    rank, _ = _dist_info()
    say = log if (log is not None and rank == 0) else (lambda _msg: None)
    device = torch.device(device)
    results, total_items, t_start = {}, 0, time.time()
    for task in tasks:
        t0 = last = time.time()

        def progress(done, total, label=task.label):
            nonlocal last
            now = time.time()
            if now - last >= log_every_s:
                last = now
                say(f"CORE {label}: {done}/{total} items on this rank, {done / (now - t0):.1f} items/s")

        correct, n = evaluate_task(logits_fn, tokenizer, task, max_seq_len, device,
                                   caps.get(task.label), batch_size, progress)
        counts = torch.tensor([correct, n], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        correct, n = counts[0].item(), int(counts[1].item())
        seconds = time.time() - t0
        acc = correct / n
        results[task.label] = {
            "accuracy": acc,
            "centered": centered(acc, task.random_baseline),
            "n": n,
            "random_baseline": task.random_baseline,
            "seconds": seconds,
            "items_per_s": n / seconds if seconds > 0 else math.inf,
        }
        total_items += n
        r = results[task.label]
        say(f"CORE {task.label:<34} accuracy {acc:.4f}  centered {r['centered']:+.4f}  "
            f"n {n}  ({seconds:.1f}s, {r['items_per_s']:.1f} items/s)")

    core = sum(r["centered"] for r in results.values()) / len(results)
    missing = [label for label in CORE_LABELS if label not in results]
    offline = any(t.source == "offline" for t in tasks)
    present = len(CORE_LABELS) - len(missing)
    name = "CORE" if not missing and not offline else \
        f"CORE ({present}/{len(CORE_LABELS)} tasks{', offline substitute' if offline else ''})"
    elapsed = time.time() - t_start
    say(f"{name}: {core:.4f}" + (f"  (missing: {', '.join(missing)})" if missing else ""))
    return {
        "core": core,
        "core_name": name,
        "tasks": results,
        "missing_tasks": missing,
        "items_per_s": total_items / elapsed if elapsed > 0 else math.inf,
    }
