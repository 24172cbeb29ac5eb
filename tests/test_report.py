"""The report: markdown, the stage x metric table, plots, cost, graceful gaps; lineage trees; the stage."""

import hashlib
import json
import time

import pytest
from conftest import SMALL

from nanopipe.cli import main as cli
from nanopipe.report import ReportError, artifact_markdown, build_report, lineage_tree, summary_table
from nanopipe.store import Store

PNG = b"\x89PNG\r\n\x1a\n"
H100 = "NVIDIA H100 80GB HBM3"


def commit(store: Store, stage: str, metrics: dict, files: dict | None = None, upstream: dict | None = None,
           seconds: float = 10.0) -> dict:
    """Commit a stage the way the runner does: files first, manifest last."""
    ident = [stage, sorted(m["key"] for m in (upstream or {}).values()), metrics]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    w = store.writer(stage, key)
    for rel, data in (files or {}).items():
        w.write_bytes(rel, data if isinstance(data, bytes) else json.dumps(data).encode())
    return w.commit(config={}, upstream=upstream or {}, code_version="v1-test", metrics=metrics,
                    started_at=time.time() - seconds)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


@pytest.fixture
def pipeline(store):
    """Every stage of a finished run, with the metric names the real stages use."""
    env = {"cpu_count": 96, "gpus": [H100] * 8, "cuda_version": "12.8", "platform": "Linux-x86_64",
           "python": "3.11.7", "packages": {"torch": "2.13.0", "prefect": "3.9.1"}}
    m = {"setup": commit(store, "setup", {"gpus": 8}, {"env.json": env}, seconds=5)}
    m["tokenizer"] = commit(store, "tokenizer", {"vocab_size": 65536, "train_chars": 2_000_000_000,
                                                 "heldout_bytes_per_token": 4.82},
                            {"tok_eval.md": b"| Text | Ours B/tok |\n|---|---|\n| news | 4.91 |\n"}, seconds=60)
    m["data"] = commit(store, "data", {"train_shards": 240, "train_docs": 1_900_000, "val_docs": 10_000}, seconds=300)
    curve = {"train": [[s, 10.0 - s / 100] for s in range(0, 500, 10)], "val_bpb": [[0, 3.0], [250, 1.2], [499, 0.81]]}
    m["base_train"] = commit(store, "base_train", {"val_bpb": 0.8123, "final_loss": 2.61, "mfu": 48.2,
                                                   "nested": {"peak_mem_gb": 70.5}},
                             {"loss_curve.json": curve}, upstream={"tokenizer": m["tokenizer"], "data": m["data"]},
                             seconds=3 * 3600)
    m["base_eval"] = commit(store, "base_eval", {"val_bpb": 0.81, "core": 0.2219}, upstream={"base_train": m["base_train"]})
    m["mid_train"] = commit(store, "mid_train", {"val_loss": 1.1}, {"loss_curve.json": {"train": [[0, 2.0], [9, 1.5]]}},
                            upstream={"base_train": m["base_train"]})
    m["sft"] = commit(store, "sft", {"val_loss": 1.0}, upstream={"mid_train": m["mid_train"]})
    m["chat_eval"] = commit(store, "chat_eval", {"mid/arc_easy": 0.3561, "mid/mmlu": 0.3111, "mid/chatcore": 0.0730,
                                                 "sft/arc_easy": 0.3876, "sft/gsm8k": 0.0455, "sft/humaneval": 0.0854},
                            upstream={"sft": m["sft"]})
    m["rl"] = commit(store, "rl", {"gsm8k_pass@1_before": 0.0455, "gsm8k_pass@1_after": 0.0758}, upstream={"sft": m["sft"]})
    return m


def test_stage_by_metric_table_takes_each_cell_from_its_stage(pipeline):
    t = summary_table(pipeline)
    assert t["CORE"] == {"BASE": 0.2219, "MID": None, "SFT": None, "RL": None}
    assert t["ARC-Easy"] == {"BASE": None, "MID": 0.3561, "SFT": 0.3876, "RL": None}
    assert t["GSM8K"] == {"BASE": None, "MID": None, "SFT": 0.0455, "RL": 0.0758}  # RL: pass@1 after RL
    assert t["ChatCORE"]["MID"] == 0.0730 and t["ChatCORE"]["SFT"] is None
    assert list(t) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]


def test_full_report_has_every_section_plots_and_cost(store, pipeline):
    rep = build_report(store, pipeline, git={"commit": "abc123def4567890", "branch": "main", "dirty": True})
    md = rep.markdown
    assert "| CORE | 0.2219 | - | - | - |" in md
    assert "| ARC-Easy | - | 0.3561 | 0.3876 | - |" in md
    assert "| GSM8K | - | - | 0.0455 | 0.0758 |" in md
    assert "`abc123def456` on main (uncommitted changes)" in md
    assert "| GPUs | 8 x NVIDIA H100 80GB HBM3 |" in md and "| prefect | 3.9.1 |" in md
    assert "| news | 4.91 |" in md  # the tokenizer's tok-eval table
    assert "| `base_train` |" in md and "3h00m" in md  # wall time
    assert "| `nested.peak_mem_gb` | 70.5000 |" in md and "| `mfu` | 48.2000 |" in md  # every metric
    assert set(rep.plots) == {"plots/base_train_loss.png", "plots/mid_train_loss.png"}
    assert all(png.startswith(PNG) for png in rep.plots.values())
    assert "![base_train loss curve](plots/base_train_loss.png)" in md
    total = sum(m["timings"]["seconds"] for m in pipeline.values())
    assert rep.data["total_seconds"] == pytest.approx(total, abs=0.01)
    assert rep.data["cost_usd"] == pytest.approx(8 * 3.00 * total / 3600, abs=0.01)  # 8 H100s at $3/h
    assert f"**${rep.data['cost_usd']:,.2f}**" in md
    assert build_report(store, pipeline, gpu_hour_usd=2.0).data["cost_usd"] == pytest.approx(16 * total / 3600, abs=0.01)
    assert json.loads(json.dumps(rep.data))["table"]["CORE"]["BASE"] == 0.2219

def test_summary_names_which_core_was_scored(store):
    """CORE on the offline substitute must not pass for nanochat's CORE in the summary table."""
    for name in ("CORE", "CORE (20/22 tasks, offline substitute)"):
        m = {"base_eval": commit(store, "base_eval", {"core": 0.1234, "core_name": name})}
        assert f"| {name} | 0.1234 | - | - | - |" in build_report(store, m, git={}).markdown



def test_partial_pipeline_shows_dashes(store, pipeline):
    rep = build_report(store, {"tokenizer": pipeline["tokenizer"]})
    md = rep.markdown
    assert "| CORE | - | - | - | - |" in md and "| HumanEval | - | - | - | - |" in md
    assert "| git commit | - |" in md and "| GPUs | - |" in md
    assert "no stage in this report recorded a loss curve" in md
    assert "no setup stage, so the hardware is unknown" in md
    assert rep.plots == {} and rep.data["cost_usd"] is None
    cpu = build_report(store, {"setup": commit(store, "setup", {}, {"env.json": {"cpu_count": 2, "gpus": []}})})
    assert "on CPU (2 cores), no GPU cost" in cpu.markdown and cpu.data["cost_usd"] is None


def test_malformed_loss_curve_names_the_file(store, pipeline):
    bad = commit(store, "sft", {}, {"loss_curve.json": {"train": [[0, "x"]]}}, upstream={"data": pipeline["data"]})
    with pytest.raises(ReportError, match=r"sft/[0-9a-f]{16}/loss_curve.json: series 'train'"):
        build_report(store, {"sft": bad})


def test_artifact_markdown_inlines_plots(store, pipeline):
    rep = build_report(store, pipeline)
    w = store.writer("report", "f" * 64)
    for rel, png in rep.plots.items():
        w.write_bytes(rel, png)
    w.write_bytes("report.md", rep.markdown.encode())
    m = w.commit(config={}, upstream={}, code_version="v1", metrics={}, started_at=time.time())
    md = artifact_markdown(store, m)
    assert "](plots/" not in md and md.count("](data:image/png;base64,") == 2


def test_lineage_tree(store, pipeline):
    sft = pipeline["sft"]
    tree = lineage_tree(store, pipeline["base_eval"])
    k = {s: m["key"][:16] for s, m in pipeline.items()}
    lines = tree.splitlines()
    assert [line.rsplit("  ", 2)[0] for line in lines] == [
        f"base_eval/{k['base_eval']}",
        f"└── base_train/{k['base_train']}",
        f"    ├── tokenizer/{k['tokenizer']}",
        f"    └── data/{k['data']}",
    ]
    assert lines[1].endswith("3h00m")
    # A diamond is expanded once; a removed or rebuilt upstream is marked.
    both = commit(store, "chat_eval", {}, upstream={"sft": sft, "base_train": pipeline["base_train"]})
    store.remove(store.stage_dir("data", pipeline["data"]["key"]))
    tree = [line.rsplit("  ", 2)[0] if "(" not in line else line for line in lineage_tree(store, both).splitlines()]
    assert tree == [f"chat_eval/{both['key'][:16]}",
                    f"├── base_train/{k['base_train']}",
                    f"│   ├── tokenizer/{k['tokenizer']}",
                    f"│   └── data/{k['data']}  (removed from the store)",
                    f"└── sft/{k['sft']}",
                    f"    └── mid_train/{k['mid_train']}",
                    f"        └── base_train/{k['base_train']}  (shown above)"]
    w = store.writer("tokenizer", pipeline["tokenizer"]["key"])  # forced rebuild, different bytes
    w.write_bytes("tok_eval.md", b"changed\n")
    w.commit(config={}, upstream={}, code_version="v1-test", metrics={}, started_at=time.time())
    assert "(outputs changed since: rebuilt after this was built)" in lineage_tree(store, pipeline["base_train"])


@pytest.mark.e2e
def test_report_stage_commits_report_and_the_report_command_prints_it(tmp_path, monkeypatch, capsys):
    """The real stage over real setup/tokenizer/data outputs (a DAG where report reads only those)."""
    from nanopipe.config import load_config
    from nanopipe.runner import run_pipeline
    from nanopipe.stages import STAGES

    monkeypatch.setitem(STAGES, "report", ("setup", "tokenizer", "data"))
    store = Store(str(tmp_path / "store"))
    done = run_pipeline(store, load_config("tiny", SMALL), ["setup", "tokenizer", "data", "report"], log=lambda s: None)
    m, reused = done["report"]
    assert not reused and {"report.md", "report.json"} <= {f["path"] for f in m["files"]}
    assert m["metrics"]["stages"] == 3 and m["metrics"]["cost_usd"] is None  # CPU only
    data = json.loads(store.read_bytes(m, "report.json"))
    assert set(data["stages"]) == {"setup", "tokenizer", "data"}
    assert data["stages"]["tokenizer"]["metrics"]["vocab_size"] == 512
    sets = [arg for o in SMALL for arg in ("--set", o)]
    cli(["report", "--store", store.url, *sets])
    out = capsys.readouterr().out
    assert out.startswith("# nanopipe report") and "| vocab size |" in out and "| 512 |" in out
    with pytest.raises(SystemExit) as failed:
        cli(["report", "--store", store.url, *sets, "--set", "data.docs_per_shard=300"])
    assert failed.value.code == 2
    assert "no committed report for preset 'tiny'" in capsys.readouterr().err
