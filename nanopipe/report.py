"""The pipeline report: one markdown page, plus loss-curve plots, built from committed manifests.

    rep = build_report(store, {"setup": m_setup, "tokenizer": m_tok, ...})
    rep.markdown     report.md: environment, tokenizer, the stage x metric table, every stage's
                     metrics and wall time, loss curves, estimated cost
    rep.plots        {"plots/base_train_loss.png": png bytes, ...} (report.md links them relatively)
    rep.data         the same numbers as JSON (report.json)

Whatever is missing (a stage not run, a metric a stage does not report) shows as "-", so a
report of a partial pipeline is still a report. Also here: `lineage_tree` for
`nanopipe artifacts show`.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

from nanopipe import lineage
from nanopipe.dag import in_order
from nanopipe.gpus import gpu_of
from nanopipe.store import Store, output_digest

MISSING = "-"

# The stage x metric table (as in nanochat's report): rows are benchmarks, columns are the model
# after each training phase. chat_eval names its metrics "<phase>/<task>".
TABLE_COLUMNS = {"BASE": "base", "MID": "mid", "SFT": "sft", "RL": "rl"}
TABLE_ROWS = {"CORE": "core", "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "MMLU": "mmlu",
              "GSM8K": "gsm8k", "HumanEval": "humaneval", "ChatCORE": "chatcore"}
# Where a cell comes from besides chat_eval's "<phase>/<task>", tried first to last.
_CELL_SOURCES = {
    ("base", "core"): [("base_eval", "core")],
    ("rl", "gsm8k"): [("chat_eval", "rl/gsm8k"), ("rl", "gsm8k_pass@1_after")],  # GSM8K pass@1 after RL
}

# Rough on-demand USD per GPU-hour (Lambda's list where it has the GPU, else typical cloud prices), by
# nanopipe.gpus key: the report's cost of a run and `nanopipe plan`'s estimate; report.gpu_hour_usd and
# plan's --price-per-gpu-hour override them. nanochat's speedrun: 8 x H100 at $24/h.
PRICE_PER_GPU_HOUR = {"h100-pcie": 2.49, "h100-80gb": 3.00, "h200": 3.79, "b200": 4.99, "a100-40gb": 1.29,
                      "a100-80gb": 1.79, "l40s": 1.00, "l4": 0.70, "a10g": 1.00, "a10": 0.75, "4090": 0.40,
                      "v100": 0.55}
DEFAULT_GPU_HOUR_USD = 2.00  # a GPU without a price above


class ReportError(ValueError):
    """A committed file the report reads is not in the expected shape; the message names it."""


@dataclass
class Report:
    markdown: str
    plots: dict[str, bytes] = field(default_factory=dict)
    data: dict = field(default_factory=dict)


# ----- small formatting helpers -----

def fmt(v) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return MISSING
    if s < 60:
        return f"{s:.1f}s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Nested metric dicts as dotted names; lists are left out (they are series, not metrics)."""
    out = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif not isinstance(v, list):
            out[name] = v
    return out


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def git_info(path: str | None = None) -> dict:
    """Commit, branch and dirtiness of the checkout holding this code ({} when it is not a git checkout)."""
    where = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "branch": branch, "dirty": dirty}


# ----- the stage x metric table -----

def cell(manifests: dict[str, dict], phase: str, task: str):
    """One value of the stage x metric table, or None."""
    for stage, metric in _CELL_SOURCES.get((phase, task), []) + [("chat_eval", f"{phase}/{task}")]:
        value = manifests.get(stage, {}).get("metrics", {}).get(metric)
        if value is not None:
            return value
    return None


def summary_table(manifests: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    return {row: {col: cell(manifests, phase, task) for col, phase in TABLE_COLUMNS.items()}
            for row, task in TABLE_ROWS.items()}


# ----- loss curves -----

def read_curve(store: Store, manifest: dict) -> dict[str, list[tuple[float, float]]]:
    """loss_curve.json as {series: [(step, value), ...]}; a malformed file is an error naming it."""
    where = f"{manifest['stage']}/{manifest['key'][:16]}/loss_curve.json"
    try:
        raw = json.loads(store.read_bytes(manifest, "loss_curve.json"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: expected an object of series, got {type(raw).__name__}")
    curve = {}
    for name, points in raw.items():
        if not isinstance(points, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p) for p in points):
            raise ReportError(f"{where}: series {name!r} must be a list of [step, value] pairs")
        if points:
            curve[name] = [(float(s), float(v)) for s, v in points]
    return curve


def plot_curve(stage: str, curve: dict[str, list[tuple[float, float]]]) -> bytes:
    """A PNG with one panel per series (train loss and val bpb have different units)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(curve), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, points) in enumerate(curve.items()):
        ax = fig.add_subplot(1, len(curve), i + 1)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) <= 20 else None, markersize=3)
        ax.set_title(f"{stage}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    # Fixed metadata: the same curve gives the same bytes, so the report's outputs are reproducible.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----- cost -----

def gpu_rate(gpus: list[str], gpu_hour_usd: float | None) -> float:
    """USD per hour of the host's GPUs: the given per-GPU price, else a rough price by GPU model."""
    if gpu_hour_usd is not None:
        return gpu_hour_usd * len(gpus)
    total = 0.0
    for name in gpus:
        gpu = gpu_of(name)
        total += PRICE_PER_GPU_HOUR.get(gpu.key, DEFAULT_GPU_HOUR_USD) if gpu else DEFAULT_GPU_HOUR_USD
    return total


# ----- the report -----

def ordered(manifests: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(s, manifests[s]) for s in in_order(manifests)]


def build_report(store: Store, manifests: dict[str, dict], git: dict | None = None,
                 gpu_hour_usd: float | None = None, now: dt.datetime | None = None) -> Report:
    """The report of the given committed stages (stage name -> manifest); any may be missing."""
    now = now or dt.datetime.now(dt.timezone.utc)
    stages = ordered(manifests)
    verify_results(store, manifests)
    env = _setup_env(store, manifests.get("setup"))
    plots: dict[str, bytes] = {}
    out = [f"# nanopipe report\n\ngenerated {now.isoformat(timespec='seconds')} from "
           f"{len(stages)} committed stage(s) in `{store.url}`\n"]

    # Environment
    g = git or {}
    commit = f"`{g['commit'][:12]}` on {g.get('branch', MISSING)}{' (uncommitted changes)' if g.get('dirty') else ''}" \
        if g.get("commit") else MISSING
    gpus = env.get("gpus") or []
    hw = [["git commit", commit],
          ["hosts", ", ".join(sorted({m.get("host", {}).get("hostname", MISSING) for _, m in stages})) or MISSING],
          ["platform", env.get("platform", MISSING)],
          ["CPUs", env.get("cpu_count")],
          ["GPUs", f"{len(gpus)} x {gpus[0]}" if gpus else ("none" if env else MISSING)],
          ["CUDA", env.get("cuda_version")],
          ["python", env.get("python", _first_version(stages, "python"))]]
    roundtrip = manifests.get("setup", {}).get("metrics", {}).get("store_roundtrip_s")
    if roundtrip is not None:  # measured by setup: a metric, so that it does not key the report
        hw.append(["store round trip", f"{roundtrip * 1000:.1f} ms"])
    packages = env.get("packages") or {"torch": _first_version(stages, "torch"),
                                       "nanopipe": _first_version(stages, "nanopipe")}
    hw += [[name, version] for name, version in packages.items()]
    out.append("## Environment\n\n" + md_table(["item", "value"], hw) + "\n")

    # Tokenizer
    tok = manifests.get("tokenizer")
    out.append("## Tokenizer\n")
    if tok:
        m = tok["metrics"]
        out.append(md_table(["vocab size", "training chars", "held-out bytes/token"],
                            [[m.get("vocab_size"), m.get("train_chars"), m.get("heldout_bytes_per_token")]]) + "\n")
        if "tok_eval.md" in _files(tok):
            out.append("Compression on sample texts, against GPT-2 and GPT-4's tokenizers:\n\n"
                       + store.read_bytes(tok, "tok_eval.md").decode().strip() + "\n")
    else:
        out.append(f"{MISSING} (the tokenizer stage is not in this report)\n")

    # Summary: the stage x metric table
    table = summary_table(manifests)
    # which CORE: "CORE" (the published bundle, as nanochat's) or e.g. "CORE (20/22 tasks, offline substitute)"
    core_name = manifests.get("base_eval", {}).get("metrics", {}).get("core_name") or "CORE"
    out.append("## Summary\n\n" + md_table(["Metric", *TABLE_COLUMNS],
                                          [[core_name if row == "CORE" else row, *cols.values()]
                                           for row, cols in table.items()]) + "\n")

    # Every stage: wall time and metrics
    total_s = sum(m["timings"]["seconds"] for _, m in stages)
    rows = [[f"`{s}`", f"`{m['key'][:16]}`", m["created_at"], m.get("host", {}).get("hostname", MISSING),
             fmt_seconds(m["timings"]["seconds"])] for s, m in stages]
    rows.append(["**total**", "", "", "", f"**{fmt_seconds(total_s)}**"])
    out.append("## Stages\n\n" + md_table(["stage", "key", "built", "host", "wall time"], rows) + "\n")
    for s, m in stages:
        flat = flatten(m["metrics"])
        body = md_table(["metric", "value"], [[f"`{k}`", v] for k, v in flat.items()]) if flat else "no metrics"
        out.append(f"### {s}\n\n{body}\n")

    # Loss curves
    curves = [(s, m) for s, m in stages if "loss_curve.json" in _files(m)]
    out.append("## Loss curves\n")
    for s, m in curves:
        curve = read_curve(store, m)
        if not curve:
            out.append(f"{s}: {MISSING} (empty curve)\n")
            continue
        rel = f"plots/{s}_loss.png"
        plots[rel] = plot_curve(s, curve)
        last = ", ".join(f"{name} {fmt(points[-1][1])} at step {points[-1][0]:g}" for name, points in curve.items())
        out.append(f"![{s} loss curve]({rel})\n\n{s}: {last}\n")
    if not curves:
        out.append(f"{MISSING} (no stage in this report recorded a loss curve)\n")

    # Cost
    rate = gpu_rate(gpus, gpu_hour_usd)
    cost = round(rate * total_s / 3600, 2) if gpus else None
    out.append("## Estimated cost\n")
    if gpus:
        out.append(f"{fmt_seconds(total_s)} of stage wall time on {len(gpus)} x {gpus[0]} at ${rate:.2f}/h "
                   f"(the sum of every stage's build time): **${cost:,.2f}**\n")
    elif env:
        out.append(f"{fmt_seconds(total_s)} of stage wall time on CPU ({env.get('cpu_count', MISSING)} cores), "
                   "no GPU cost\n")
    else:
        out.append(f"{MISSING} (no setup stage, so the hardware is unknown); stage wall time {fmt_seconds(total_s)}\n")

    data = {"generated_at": now.isoformat(timespec="seconds"), "git": g, "table": table,
            "total_seconds": round(total_s, 3), "cost_usd": cost, "gpu_hour_usd": rate if gpus else None,
            "stages": {s: {"key": m["key"], "seconds": m["timings"]["seconds"], "metrics": m["metrics"]}
                       for s, m in stages},
            "plots": sorted(plots)}
    return Report("\n".join(out), plots, data)


def verify_results(store: Store, manifests: dict[str, dict]) -> None:
    """Check every result file (JSON, markdown) of the reported stages against its manifest: the
    report's numbers come from those manifests, so a damaged result must stop it, naming the file.
    Weights and shards are checked by the stages that load them and by `nanopipe verify`."""
    for m in manifests.values():
        for rel in sorted(_files(m)):
            if rel.endswith((".json", ".md")):
                store.read_bytes(m, rel)


def _files(manifest: dict) -> set[str]:
    return {f["path"] for f in manifest["files"]}


def _first_version(stages, name: str):
    return next((m["versions"][name] for _, m in stages if m.get("versions", {}).get(name)), None)


def _setup_env(store: Store, setup: dict | None) -> dict:
    if not setup or "env.json" not in _files(setup):
        return {}
    return json.loads(store.read_bytes(setup, "env.json"))


def artifact_markdown(store: Store, manifest: dict) -> str:
    """A committed report.md for the Prefect UI: plots inlined as data URIs (the UI cannot read the store)."""
    text = store.read_bytes(manifest, "report.md").decode()
    files = _files(manifest)

    def inline(match: re.Match) -> str:
        rel = match.group(2)
        if rel not in files:
            return match.group(0)
        data = base64.b64encode(store.read_bytes(manifest, rel)).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, text)


# ----- `nanopipe artifacts show`: lineage as a tree -----

def lineage_tree(store: Store, manifest: dict) -> str:
    """Which upstream outputs built a manifest, recursively, one line per stage:

        report/5e0c1d2a3b4c5d6e  2026-11-25T11:42:16+00:00  1.2s
        ├── tokenizer/b85170d5ba6da168  2026-11-25T11:42:07+00:00  1.8s
        └── base_train/73de6b2fa61f463f  2026-11-25T11:42:16+00:00  2.6s
            ├── tokenizer/b85170d5ba6da168  (shown above)
            └── data/b2507038a971ab6e  (removed from the store)

    A stage reached twice is expanded once. "outputs changed since" marks an upstream that was
    rebuilt (forced) with different bytes than the ones this manifest was built from.
    """
    links = lineage.graph(store, manifest)
    lines = [_node(manifest)]
    shown = {manifest["key"]}

    def render(key: str, prefix: str) -> None:
        for i, up in enumerate(links[key]):
            last = i == len(links[key]) - 1
            branch, child_prefix = ("└── ", "    ") if last else ("├── ", "│   ")
            if up.manifest is None:
                lines.append(f"{prefix}{branch}{up}  (removed from the store)")
                continue
            note = "  (outputs changed since: rebuilt after this was built)" \
                if up.digest and output_digest(up.manifest) != up.digest else ""
            if up.key in shown:
                lines.append(f"{prefix}{branch}{up}  (shown above){note}")
                continue
            shown.add(up.key)
            lines.append(f"{prefix}{branch}{_node(up.manifest)}{note}")
            render(up.key, prefix + child_prefix)

    render(manifest["key"], "")
    return "\n".join(lines)


def _node(m: dict) -> str:
    return f"{m['stage']}/{m['key'][:16]}  {m['created_at']}  {fmt_seconds(m['timings']['seconds'])}"
