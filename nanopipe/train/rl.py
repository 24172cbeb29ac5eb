"""Reinforcement learning on answers that can be checked (nanochat's chat_rl: simplified GRPO).

Each step, every rank takes its share of `examples_per_step` training questions and:
  1. samples `num_samples` completions per question with the engine (tools on: the calculator
     and the python sandbox answer <|python_start|> calls, and their output is forced in);
  2. scores each completion with the task: reward 1 for the right final number, else 0;
  3. advantage = reward - mean reward of its question's group (optionally / the group's std);
     questions whose samples all agree teach nothing and get advantage 0;
  4. takes one policy-gradient step on  -sum(A * log p(token)) / (sampled tokens in the step),
     over the tokens the model sampled (the prompt and forced tool output are masked out).
This is on-policy REINFORCE with a group-mean baseline: no KL term, no ratio clipping, no
reference model, as in nanochat. The LR decays linearly to zero (the stage's schedule).

Every `eval_every` steps (and before the first and after the last), pass@1 and pass@k are
measured on held-out questions: k samples each, pass@1 the mean fraction right (the unbiased
estimate from k samples), pass@k the fraction of questions with at least one right.

Resume is exact: sampling is seeded from (seed, step, question slot), the questions of a step
are a function of the step, and checkpoints hold the model, optimizer, RNG state and the
reward/eval history; a resumed run samples the very completions an uninterrupted one would.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanopipe.chat import render_for_completion
from nanopipe.engine import Engine
from nanopipe.tasks import Mixture, Task, TaskSequence, make_task
from nanopipe.tasks.gsm_symbolic import GSMSymbolic
from nanopipe.train.common import (Dist, LoopSpec, StepOut, init_distributed, loop_metrics, save_model, train_loop,
                                   warm_start)

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

# ----- the math: pass@k, advantages, the loss -----

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """(groups, samples) rewards -> advantages: reward minus its group's mean, optionally / the group's std."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, samples), got shape {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv


def pg_loss(logp: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """Policy-gradient loss of a batch of rows, normalised per token.

    logp (B, T): log-probability of each target token; targets (B, T): -1 where the token is not
    trained on (prompt, forced tool output, padding); advantages (B,): one per row (sequence);
    num_tokens: the sampled tokens of the whole step (all micro-batches, all ranks), so every
    token weighs the same however the step is split. Minimising it raises the likelihood of
    tokens in better-than-average samples and lowers it in worse ones.
    """
    valid = (targets >= 0).to(logp.dtype)
    return -(logp * valid * advantages[:, None].to(logp.dtype)).sum() / num_tokens


# ----- data -----

def build_train_set(cfg) -> Task:
    tasks = [make_task(s.task, **s.args) for s in cfg.train_tasks]
    epochs = [s.epochs for s in cfg.train_tasks]
    if cfg.gsm_symbolic:
        tasks.append(GSMSymbolic(size=cfg.gsm_symbolic, seed=cfg.seed))
        epochs.append(1.0)
    return Mixture(tasks, epochs=epochs, seed=cfg.seed)


def first(task: Task, n: int) -> Task:
    """A view of the first n examples of a task."""
    return task if n >= len(task) else TaskSequence([task], stop=n)


def user_prompt(conversation: dict) -> str:
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def decontaminate(train: Task, *held_out: Task) -> list[int]:
    """Indices of the training questions whose text is not a held-out question. Generated tasks
    can draw the same small problem into both splits; it must not be trained on."""
    banned = {user_prompt(t[i]) for t in held_out for i in range(len(t))}
    return [i for i in range(len(train)) if user_prompt(train[i]) not in banned]


def step_examples(step: int, examples_per_step: int, pool: list[int], seed: int) -> list[int]:
    """Training questions of a step: a fresh seeded shuffle of the pool per pass, walked in order."""
    out = []
    for slot in range(step * examples_per_step, (step + 1) * examples_per_step):
        epoch, pos = divmod(slot, len(pool))
        out.append(pool[_epoch_order(seed, epoch, len(pool))[pos]])
    return out


@functools.lru_cache(maxsize=2)  # a step reads at most two passes
def _epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"rl:{seed}:{epoch}").shuffle(order)
    return order


# ----- sampling and scoring -----

@dataclass
class Group:
    """The samples of one question: tokens and masks (1 sampled, 0 forced) as the engine gave them."""
    prompt: list[int]
    tokens: list[list[int]]
    masks: list[list[int]]
    rewards: list[float]


def scorer(task: Task, index: int) -> Task:
    """The task that scores example `index`: for a Mixture, the member task it came from."""
    if isinstance(task, Mixture):
        k, _ = task.locate(task.start + index * task.step)
        return task.tasks[k]
    return task


def sample_groups(engine: Engine, tok, task: Task, indices: list[int], seeds: list[int], num_samples: int,
                  max_tokens: int, temperature: float, top_k: int | None) -> list[Group]:
    """num_samples completions of each question, scored. A prompt that leaves no room to answer in
    the engine's context gets no samples (and so no reward and no gradient)."""
    convs = [task[i] for i in indices]
    prompts = [render_for_completion(tok, c) for c in convs]
    requests = [engine.add_request(p, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=s,
                                   num_samples=num_samples) if len(p) < engine.max_seq_len else None
                for p, s in zip(prompts, seeds)]
    while engine.has_work():
        engine.step()
    groups = []
    for index, conv, prompt, req in zip(indices, convs, prompts, requests):
        if req is None:
            groups.append(Group(prompt, [], [], []))
            continue
        rewards = [float(scorer(task, index).reward(conv, tok.decode(t))) for t in req.tokens]
        groups.append(Group(prompt, req.tokens, req.masks, rewards))
    return groups


def _all_sum(d: Dist, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def evaluate_pass_at_k(d: Dist, engine: Engine, tok, task: Task, n: int, k: int, max_tokens: int,
                       temperature: float, top_k: int | None, seed: int) -> dict:
    """pass@1 and pass@k over the first n questions of `task`, k samples each, shared across ranks.
    The same seed gives every question the same random stream, so evaluations are comparable."""
    mine = list(range(d.rank, min(n, len(task)), d.world_size))
    groups = sample_groups(engine, tok, task, mine, [seed + i for i in mine], k, max_tokens, temperature, top_k)
    p1 = sum(pass_at_k(k, int(sum(g.rewards)), 1) for g in groups if g.rewards)
    pk = sum(pass_at_k(k, int(sum(g.rewards)), k) for g in groups if g.rewards)
    p1, pk, count = _all_sum(d, [p1, pk, len(groups)])
    return {"pass@1": p1 / max(count, 1), f"pass@{k}": pk / max(count, 1), "n": int(count), "k": k}


# ----- the policy-gradient step -----

def rows_of(groups: list[Group], std_normalize: bool) -> list[tuple[list[int], list[int], float]]:
    """(ids, mask, advantage) per sample: ids = prompt + completion, mask 1 on sampled tokens."""
    rows = []
    for g in groups:
        if not g.rewards:
            continue
        adv = group_advantages(torch.tensor([g.rewards]), std_normalize)[0].tolist()
        for toks, mask, a in zip(g.tokens, g.masks, adv):
            rows.append((g.prompt + toks, [0] * len(g.prompt) + mask, a))
    return rows


def policy_gradient(d: Dist, model, rows, device_batch_size: int, pad_id: int) -> tuple[float, int]:
    """Accumulate the gradient of this rank's rows in micro-batches (the loop then steps).
    Returns this rank's part of the step's loss and the tokens it fed forward."""
    own_tokens = sum(sum(m[1:]) for _, m, _ in rows)
    (total_tokens,) = _all_sum(d, [own_tokens])
    # The optimizers average gradients over ranks, so scale each rank's sum back up by the world size.
    norm = max(total_tokens, 1.0) / d.world_size
    fed = 0
    device = d.device
    total = torch.zeros((), device=device)
    if not rows:  # nothing to learn from here; zero gradients keep every rank in the optimizers' all-reduce
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    for start in range(0, len(rows), device_batch_size):
        batch = rows[start:start + device_batch_size]
        width = max(len(ids) for ids, _, _ in batch) - 1
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        for r, (ids, mask, _) in enumerate(batch):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        adv = torch.tensor([a for _, _, a in batch], dtype=torch.float32, device=device)
        x, y = x.to(device), y.to(device)
        with d.autocast():
            nll = model(x, y, loss_reduction="none")
        loss = pg_loss(-nll, y, adv, norm)
        loss.backward()
        total += loss.detach()
        fed += x.numel()
    return total.item() / d.world_size, fed


# ----- the stage -----

def train(ctx: "StageContext") -> dict:
    """Warm-start from the upstream SFT model and train on the configured questions (the rl stage's run)."""
    cfg = ctx.config
    d = init_distributed(cfg.device, cfg.threads, cfg.seed)
    log = ctx.log if d.is_master else (lambda s: None)
    parent, tok, model, optimizers = warm_start(ctx, d)
    log(f"[rl] {optimizers[1].describe()}")
    context = min(cfg.max_seq_len, model.rotary_seq_len)
    engine = Engine(model, tok, max_batch=cfg.engine_batch, max_seq_len=context)

    train_set = build_train_set(cfg)
    eval_task = make_task(cfg.eval_task.task, **cfg.eval_task.args)
    eval_is_gsm8k = cfg.eval_task.task == "gsm8k" and cfg.eval_task.args.get("split", "eval") == "eval"
    gsm8k = None if eval_is_gsm8k or not cfg.gsm8k_examples else make_task("gsm8k", split="eval")
    n_eval = min(cfg.eval_examples, len(eval_task))
    held_out = [first(eval_task, n_eval)] + ([first(gsm8k, cfg.gsm8k_examples)] if gsm8k is not None else [])
    pool = decontaminate(train_set, *held_out)
    if not pool:
        raise ValueError("rl: every training question is also a held-out question; choose disjoint "
                         "train_tasks and eval_task")
    per_rank, rem = divmod(cfg.examples_per_step, d.world_size)
    if rem:
        raise ValueError(f"rl: examples_per_step ({cfg.examples_per_step}) must be a multiple of the world size ({d.world_size})")
    steps = cfg.num_iterations if cfg.num_iterations > 0 else max(1, len(pool) // cfg.examples_per_step)
    k = cfg.eval_samples
    log(f"[{ctx.stage}] from {parent} {ctx.upstream[parent]['key'][:16]} | {len(pool):,} training questions "
        f"({len(train_set) - len(pool)} dropped as held out) | "
        f"{steps} steps x {cfg.examples_per_step} questions x {cfg.num_samples} samples | "
        f"held out: {n_eval} of {cfg.eval_task.task}, pass@1/pass@{k} | context {context}")
    sampling = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)

    def evaluate(step: int) -> tuple[dict, str]:
        """pass@1/pass@k on the held-out questions; before the first step and after the last, GSM8K too."""
        result = evaluate_pass_at_k(d, engine, tok, eval_task, n_eval, k, seed=cfg.seed + 7_777_777, **sampling)
        text = f"held out {_fmt(result, k)}"
        if gsm8k is not None and step in (0, steps):
            result["gsm8k"] = evaluate_pass_at_k(d, engine, tok, gsm8k, cfg.gsm8k_examples, k,
                                                 seed=cfg.seed + 7_777_777, **sampling)
            text += f" | GSM8K {_fmt(result['gsm8k'], k)}"
        return result, text

    def step_fn(step: int) -> StepOut:
        """Sample and score this rank's questions of the step, then accumulate the policy gradient."""
        indices = step_examples(step, cfg.examples_per_step, pool, cfg.seed)
        slots = range(d.rank * per_rank, (d.rank + 1) * per_rank)
        model.eval()
        with torch.no_grad(), d.autocast():
            groups = sample_groups(engine, tok, train_set, [indices[s] for s in slots],
                                   [cfg.seed + 1_000_003 * step + s for s in slots], cfg.num_samples, **sampling)
        model.train()
        loss, fed = policy_gradient(d, model, rows_of(groups, cfg.std_normalize), cfg.device_batch_size, tok.bos_id)
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(t) for g in groups for t in g.tokens]
        solved = sum(1 for g in groups if g.rewards and max(g.rewards) > 0)
        loss, r_sum, r_n, len_sum, solved, fed = _all_sum(d, [loss, sum(rewards), len(rewards), sum(lengths), solved, fed])
        return StepOut(loss, int(fed), {"reward": r_sum / max(r_n, 1), "seq_len": len_sum / max(r_n, 1),
                                        "solved": solved / cfg.examples_per_step, "samples": int(r_n),
                                        "sampled_tokens": int(len_sum)})

    spec = LoopSpec(ctx.stage, steps, model.estimate_flops(), cfg.grad_clip, cfg.warmup_ratio, cfg.warmdown_ratio,
                    cfg.final_lr_frac, cfg.eval_every, cfg.checkpoint_every, cfg.keep_checkpoints,
                    eval_at_ends=True, log_every=1, show=("reward", "solved", "seq_len"))
    state = train_loop(ctx, d, spec, model, optimizers, step_fn, evaluate, log)
    engine.close()

    evals = [{"step": s, **{key: v for key, v in r.items() if key != "gsm8k"}} for s, r in state["val"]]
    if eval_is_gsm8k:
        before_after = {"before": evals[0], "after": evals[-1]}
    else:
        before_after = {when: r["gsm8k"] for when, (_, r) in (("before", state["val"][0]), ("after", state["val"][-1]))
                        if "gsm8k" in r}
    metrics = {**loop_metrics(spec, state, d), **rl_metrics(state, evals, before_after, k)}
    metrics.update(train_examples=len(pool), train_dropped_as_held_out=len(train_set) - len(pool), eval_examples=n_eval,
                   eval_task=cfg.eval_task.task, muon_ns_dtype=optimizers[1].ns_dtype_name)
    if d.is_master:
        w = ctx.writer
        save_model(w, model)
        w.write_json("rl_curve.json", {"k": k, "steps": state["curve"], "evals": evals, "gsm8k": before_after})
        w.write_json("rl_eval.json", eval_table(cfg, evals, before_after, k))
        data = {"train": {**train_set.provenance(), "used": len(pool),
                          "dropped_as_held_out": len(train_set) - len(pool)},
                "eval": {"task": cfg.eval_task.task, "args": cfg.eval_task.args, **held_out[0].provenance()}}
        if gsm8k is not None:
            data["gsm8k_eval"] = held_out[1].provenance()
        w.write_json("rl_data.json", data)
    d.close()
    return metrics


def _fmt(result: dict, k: int) -> str:
    return f"pass@1 {result['pass@1']:.4f} | pass@{k} {result[f'pass@{k}']:.4f} (n={result['n']})"


def _window_mean(curve: list[dict], first: bool) -> float | None:
    """Mean reward over the first (or last) tenth of the steps: one step's reward is noisy."""
    if not curve:
        return None
    w = max(1, len(curve) // 10)
    part = curve[:w] if first else curve[-w:]
    return sum(e["reward"] for e in part) / len(part)


def rl_metrics(state: dict, evals: list[dict], gsm8k: dict, k: int) -> dict:
    """pass@1/pass@k before and after, the reward trend, the tokens sampled (besides the loop's metrics)."""
    before, after = evals[0], evals[-1]
    m = {"k": k, "pass@1_before": before["pass@1"], "pass@1_after": after["pass@1"],
         "pass@k_before": before[f"pass@{k}"], "pass@k_after": after[f"pass@{k}"],
         "reward_first": _window_mean(state["curve"], True), "reward_last": _window_mean(state["curve"], False),
         "sampled_tokens": sum(e["sampled_tokens"] for e in state["curve"])}
    for when, g in gsm8k.items():
        m[f"gsm8k_pass@1_{when}"], m[f"gsm8k_pass@k_{when}"] = g["pass@1"], g[f"pass@{k}"]
    return m


def eval_table(cfg, evals: list[dict], gsm8k: dict, k: int) -> list[dict]:
    """pass@1 / pass@k before and after RL, one row per (task, when): the stage's table."""
    name = f"{cfg.eval_task.task} {cfg.eval_task.args}"
    rows = [{"task": name, "when": when, "pass@1": e["pass@1"], f"pass@{k}": e[f"pass@{k}"], "n": e["n"], "step": e["step"]}
            for when, e in (("before", evals[0]), ("after", evals[-1]))]
    if gsm8k and cfg.eval_task.task != "gsm8k":
        rows += [{"task": "gsm8k {'split': 'eval'}", "when": when, "pass@1": e["pass@1"], f"pass@{k}": e[f"pass@{k}"],
                  "n": e["n"], "step": None} for when, e in gsm8k.items()]
    return rows
