"""base_train as a real stage: loss falls, kill-and-resume is bitwise exact, DDP matches, bad checkpoints refused."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from conftest import SMALL as UPSTREAM
from conftest import TRAIN as SHORT_TRAIN

from nanopipe.cli import config_status
from nanopipe.config import load_config
from nanopipe.codeid import stage_code
from nanopipe.optim import dtype_name, fast_ns_dtype
from nanopipe.progress import read_progress
from nanopipe.runner import compute_key, run_pipeline, run_stage
from nanopipe.store import Store
from test_progress import offline_runs, wandb_history

pytestmark = pytest.mark.e2e

# 12 steps: a kill can land between the step-4 and step-8 checkpoints or after, and the loss falls clearly.
TRAIN = SHORT_TRAIN + ["base_train.num_iterations=12", "base_train.eval_every=6", "base_train.embedding_lr=0.05"]


def env(**extra):
    return dict(os.environ, PYTHONPATH=os.getcwd(), **extra)


def cli(store_url, *overrides, faults=None):
    cmd = [sys.executable, "-m", "nanopipe", "stage", "base_train", "--store", store_url,
           *[x for o in UPSTREAM + TRAIN + list(overrides) for x in ("--set", o)]]
    return subprocess.run(cmd, env=env(**({"NANOPIPE_FAULTS": faults} if faults else {})),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def upstream_store(tmp_path_factory):
    """tokenizer + data built once; tests copy this store so each starts with them committed."""
    root = tmp_path_factory.mktemp("up") / "store"
    run_pipeline(Store(str(root)), load_config("tiny", UPSTREAM), ["tokenizer", "data"], log=lambda s: None)
    return root


@pytest.fixture
def store(upstream_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(upstream_store, dst)
    return Store(str(dst))


def built(store, *overrides):
    cfg = load_config("tiny", UPSTREAM + TRAIN + list(overrides))
    ups = {s: store.manifests(s)[0] for s in ("tokenizer", "data")}
    key = compute_key(cfg, "base_train", ups)
    return key, store.manifest("base_train", key)


def test_loss_falls_and_manifest_is_complete(store, edited_source):
    p = cli(store.url)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    key, m = built(store)
    assert m is not None
    curve = json.loads(store.read_bytes(m, "loss_curve.json"))
    losses = [l for _, l in curve["train"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert m["metrics"]["val_bpb"] > 0 and m["metrics"]["tokens"] == 12 * 512
    assert {"model.safetensors", "model_config.json", "loss_curve.json"} <= {f["path"] for f in m["files"]}
    assert not store.fs.exists(store.work_dir("base_train", key))  # resume state is gone after commit
    # the torchrun child records the code the parent computed the key from; status names what changed since
    assert {k: m[k] for k in ("code_version", "code")} == stage_code("base_train")
    edited_source("nanopipe.train.common", lambda t: t + "\nEDITED_CONSTANT = 1\n")
    row = {r["stage"]: r for r in config_status(store, load_config("tiny", UPSTREAM + TRAIN))}["base_train"]
    assert not row["built"] and row["why"]["state"] == "stale" and row["why"]["closest"]["key"] == key
    assert row["why"]["reasons"] == ["code: nanopipe.train.common changed"]
    dtype, why = fast_ns_dtype("cpu")  # what muon_ns_dtype=auto picks on this machine
    assert m["metrics"]["muon_ns_dtype"] == dtype_name(dtype)
    assert f"[base_train] Muon Newton-Schulz in {dtype_name(dtype)}: {why}" in p.stdout + p.stderr
    # the data it read, against what the data stage holds: a small fraction of one pass, in the metrics and the log
    passes = m["metrics"]["data_passes"]
    assert 0 < passes < 0.1 and passes == pytest.approx(12 * 512 / m["metrics"]["tokens_available"], rel=1e-3)
    assert f"{passes:.3f} passes" in p.stdout + p.stderr
    assert (m["metrics"]["device_batch_size"], m["metrics"]["grad_accum"]) == (4, 2)


def test_a_horizon_that_would_repeat_data_fails_before_any_work(store):
    p = cli(store.url, "base_train.num_iterations=5000")  # 2.56M tokens; the data stage holds ~0.5M
    assert p.returncode != 0
    [last] = p.stderr.strip().splitlines()  # one line, no traceback
    assert "tokens short" in last and "base_train.allow_data_repeat=true" in last and "data.source" in last, last
    assert not store.manifests("base_train")
    key, _ = built(store, "base_train.num_iterations=5000")
    # not a step taken, not a checkpoint written: the work dir holds only the parent's launch spec
    assert store.fs.find(store.work_dir("base_train", key)) == [store.launch_spec_path("base_train", key)]


def test_opting_in_to_repeat_data_is_recorded(store):
    from types import SimpleNamespace

    from nanopipe.runner import StageContext
    from nanopipe.sizing import SizingError
    from nanopipe.train.base import check_data, data_files, load_tokenizer

    cfg = load_config("tiny", UPSTREAM + TRAIN + ["base_train.allow_data_repeat=true"])
    ups = {s: store.manifests(s)[0] for s in ("tokenizer", "data")}
    ctx = StageContext(store, "base_train", "k", cfg.base_train, ups, writer=None)
    tok = load_tokenizer(ctx)
    available = check_data(ctx, cfg.base_train, tok, data_files(ctx, "train"), 1)["tokens_available"]
    steps = 3 * available // 512
    data = check_data(ctx, cfg.base_train, tok, data_files(ctx, "train"), steps)
    assert data["data_passes"] == pytest.approx(3, rel=1e-3)
    strict = SimpleNamespace(**{**cfg.base_train.model_dump(), "allow_data_repeat": False})
    with pytest.raises(SizingError, match=r"3\.00 times: .* tokens short"):
        check_data(ctx, strict, tok, data_files(ctx, "train"), steps)
    # the opt-in is part of base_train's config, so of its key and of the manifest it commits
    assert cfg.section("base_train")["allow_data_repeat"] is True
    assert compute_key(cfg, "base_train", ups) != compute_key(load_config("tiny", UPSTREAM + TRAIN), "base_train", ups)


def test_sigkill_then_rerun_is_bitwise_identical_and_upstream_cached(store, upstream_store, tmp_path, prefect_server):
    ref = Store(str(tmp_path / "ref"))
    shutil.copytree(upstream_store, ref.url)
    assert cli(ref.url).returncode == 0
    _, ref_m = built(ref)

    kill_at = random.Random().randint(5, 11)  # after the step-4 checkpoint, before the end
    p = cli(store.url, faults=f"base_train.step={kill_at}:kill")
    assert p.returncode != 0, f"training was not killed at step {kill_at}"
    key, m = built(store)
    assert m is None and store.fs.exists(store.work_dir("base_train", key) + "/ckpt_000004/COMPLETE"), p.stdout[-3000:]

    from flows.pipeline import pipeline, task_states

    state = pipeline(preset="tiny", overrides=UPSTREAM + TRAIN, stages=["base_train"], store=store.url, return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    assert states == {"tokenizer": "Cached", "data": "Cached", "base_train": "Completed"}
    _, m = built(store)
    sha = {f["path"]: f["sha256"] for f in m["files"]}
    ref_sha = {f["path"]: f["sha256"] for f in ref_m["files"]}
    assert sha["model.safetensors"] == ref_sha["model.safetensors"], f"resumed weights differ (killed at step {kill_at})"
    assert json.loads(store.read_bytes(m, "loss_curve.json"))["train"] == json.loads(ref.read_bytes(ref_m, "loss_curve.json"))["train"]
    # The flow run's page shows the training live: a progress artifact (100% at the end) and the metrics table.
    progress, live = (run_artifact(state.state_details.flow_run_id, key) for key in ("base-train-progress", "base-train-live"))
    assert progress.type == "progress" and float(progress.data) == 100.0 and "step 12/12" in progress.description
    rows = json.loads(live.data)
    assert live.type == "table" and rows[0]["step"] == 12 and rows[0]["loss"] > 0 and rows[0]["tokens_per_s"] > 0
    assert [r["step"] for r in rows] == sorted((r["step"] for r in rows), reverse=True)


def run_artifact(flow_run_id, key: str):
    """The one artifact of a flow run under `key` (updated in place while the stage ran)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return art


def test_progress_reaches_the_caller_while_it_runs_and_wandb_keeps_the_metrics(store, tmp_path, monkeypatch):
    """run_stage's caller gets the torchrun child's progress events (steps rising, a final 100%) while the
    progress file holds the latest; the log never shows them; the file goes at commit. Tracking changes
    no key, and W&B (offline) keeps every step's loss and every evaluation."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("tiny", UPSTREAM + TRAIN + ["tracking.wandb_project=nanopipe-test", "tracking.wandb_mode=offline",
                                                  f"tracking.wandb_dir={tmp_path}"])
    ups = {s: store.manifests(s)[0] for s in ("tokenizer", "data")}
    key = compute_key(cfg, "base_train", ups)
    assert key == built(store)[0]
    events, on_disk, logs = [], [], []

    def on_progress(event):
        events.append(event)
        on_disk.append(read_progress(store, "base_train", key))

    m, reused = run_stage(store, cfg, "base_train", ups, log=logs.append, on_progress=on_progress)
    assert not reused and m["key"] == key
    steps = [e["step"] for e in events]
    assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) >= 4, steps
    assert events[-1]["step"] == 12 and events[-1]["percent"] == 100.0 and events[-1]["eta_s"] == 0.0
    assert on_disk == events  # each event was in the progress file when the caller got it
    last = events[-1]["metrics"]
    assert last["loss"] > 0 and last["val_bpb"] == m["metrics"]["val_bpb"] and last["tokens_per_s"] > 0
    assert not any("@@progress" in line for line in logs) and any("step 12/12 | loss" in line for line in logs)
    assert read_progress(store, "base_train", key) is None and not store.fs.exists(store.work_dir("base_train", key))

    (run_dir,) = offline_runs(tmp_path)
    rows = {r["_step"]: r for r in wandb_history(run_dir)}
    curve = json.loads(store.read_bytes(m, "loss_curve.json"))
    assert [[s, rows[s]["loss"]] for s in range(12)] == curve["train"]
    assert [[s, rows[s]["val_bpb"]] for s in (0, 6, 12)] == curve["val_bpb"]


def periodic_corpus(store, path, frac=0.02):
    """jsonl of one train document repeated: with BOS it is exactly 64 tokens, so every window of
    B x T = 256 tokens is the same whichever rank or micro-batch reads it. This takes data order out
    of the comparison and leaves only the distributed math."""
    from nanopipe.data.shards import is_validation
    from nanopipe.tokenizer import Tokenizer

    tm = store.manifests("tokenizer")[0]
    tok = Tokenizer.from_files({r: store.read_bytes(tm, r) for r in ("tokenizer.ranks", "tokenizer.json")})
    words = ("the quick brown fox jumps over the lazy dog while seven wise kings "
             "watched from a distant hill and counted every star in the night sky " * 4).split()
    for n in range(len(words), 0, -1):
        doc = " ".join(words[:n]) + "."
        if len(tok.encode(doc)) == 63 and not is_validation(doc, frac):
            break
    else:
        pytest.fail("no prefix of the sentence encodes to 63 tokens")
    vals = [v for v in (f"held-out sentence {i}." for i in range(10_000)) if is_validation(v, frac)][:16]
    with open(path, "w") as f:
        for _ in range(256):
            f.write(json.dumps({"text": doc}) + "\n")
        for v in vals:
            f.write(json.dumps({"text": v}) + "\n")
    return ["data.source.kind=local", f'data.source.paths=["{path}"]', "data.source.max_chars=null", "data.source.doc_chars=null",
            "data.docs_per_shard=64", "data.row_group_size=8", f"data.val_fraction={frac}"]


def test_two_process_gloo_matches_one_process(store, tmp_path):
    data = periodic_corpus(store, tmp_path / "periodic.jsonl")
    one = cli(store.url, "base_train.num_iterations=6", *data)
    two = cli(store.url, "base_train.num_iterations=6", "base_train.nproc_per_node=2", *data)
    assert one.returncode == 0 and two.returncode == 0, one.stdout[-2000:] + two.stdout[-3000:] + two.stderr[-3000:]
    ups = {s: m for s in ("tokenizer", "data") for m in store.manifests(s) if s == "tokenizer" or m["config"]["source"]["kind"] == "local"}
    curves = []
    for extra in ([], ["base_train.nproc_per_node=2"]):
        cfg = load_config("tiny", UPSTREAM + TRAIN + ["base_train.num_iterations=6", *data, *extra])
        m = store.manifest("base_train", compute_key(cfg, "base_train", ups))
        curves.append([l for _, l in json.loads(store.read_bytes(m, "loss_curve.json"))["train"]])
    assert m["metrics"]["world_size"] == 2
    c1, c2 = curves
    assert len(c1) == len(c2) == 6 and c1[-1] < c1[0] - 0.5
    assert max(abs(a - b) for a, b in zip(c1, c2)) < 1e-4, (c1, c2)


def test_corrupt_checkpoint_is_reported_not_loaded(store):
    p = cli(store.url, faults="base_train.step=6:kill")
    assert p.returncode != 0
    key, _ = built(store)
    weights = f"{store.work_dir('base_train', key)}/ckpt_000004/model.safetensors"
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    p = cli(store.url)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "sha256 mismatch" in out and "ckpt_000004/model.safetensors" in out
    assert "resumed from checkpoint" not in out
    assert built(store)[1] is None


CHAT = ["mid_train.max_seq_len=64", "mid_train.device_batch_size=4", "mid_train.num_iterations=20",
        "mid_train.eval_every=0", "mid_train.threads=1", "sft.max_seq_len=64", "sft.device_batch_size=4",
        "sft.target_examples_per_step=8", "sft.num_iterations=20", "sft.eval_every=20", "sft.eval_batches=6", "sft.threads=1",
        "sft.init_lr_frac=0.5", 'mid_train.val_mixture=[{"task": "identity", "args": {"size": 20, "split": "test"}}]',
        'sft.val_mixture=[{"task": "identity", "args": {"size": 24, "split": "test"}}]']


def test_short_sft_lowers_held_out_chat_loss(store):
    """mid_train then sft warm-start from base; SFT's loss on held-out conversations goes down."""
    cmd = [sys.executable, "-m", "nanopipe", "stage", "sft", "--store", store.url,
           *[x for o in UPSTREAM + TRAIN + CHAT for x in ("--set", o)]]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (m,) = store.manifests("sft")
    assert m["upstream"]["mid_train"]["key"] == store.manifests("mid_train")[0]["key"]
    before, after = m["metrics"]["val_loss_start"], m["metrics"]["val_loss"]
    assert after < before - 0.05, (before, after)
