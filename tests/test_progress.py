"""Watching a run: progress events (file + parent line), the Prefect live artifacts they become,
W&B tracking, and the tracking config that changes no stage key. The real torchrun runs that
emit them are in test_base_train.py."""

import errno
import glob
import json
import math
import struct
import time
from types import SimpleNamespace

import pytest

from nanopipe.config import ConfigError, load_config
from nanopipe.progress import StageProgress, parse_progress, progress_line, read_progress
from nanopipe.runner import compute_key
from nanopipe.stages import STAGES
from nanopipe.store import Store


def context(store, rank=0, events=None, logs=None):
    return SimpleNamespace(store=store, stage="base_train", key="k" * 64, rank=rank,
                           on_progress=None if events is None else events.append,
                           log=(logs if logs is not None else []).append)


def test_events_are_rate_limited_unless_forced_and_land_in_the_progress_file(tmp_path):
    store, events = Store(str(tmp_path / "store")), []
    watch = StageProgress(context(store, events=events), total=8, every_s=60)
    assert read_progress(store, "base_train", "k" * 64) is None
    watch.update(0, force=True)
    watch.update(1, {"loss": 5.0, "tokens_per_s": 100.0})  # within every_s of the last: recorded, not reported
    watch.update(2, {"loss": 4.0, "val_bpb": float("nan")}, eta_s=30.0, force=True)
    assert [e["step"] for e in events] == [0, 2]
    e = events[-1]
    assert e["percent"] == 25.0 and e["total"] == 8 and e["eta_s"] == 30.0 and e["stage"] == "base_train"
    assert e["metrics"] == {"loss": 4.0, "tokens_per_s": 100.0, "val_bpb": None}  # merged; NaN is not JSON
    assert read_progress(store, "base_train", "k" * 64) == e
    assert parse_progress(progress_line(e)) == e
    assert parse_progress("[base_train] step 2/8 | loss 4.0") is None and parse_progress("@@progress {broken") is None
    watch.update(8, eta_s=0.0, force=True)
    assert events[-1]["percent"] == 100.0
    # without a given ETA: the time per unit so far times the units left
    watch2 = StageProgress(context(store, events=events), total=4, every_s=0)
    time.sleep(0.05)
    e = watch2.update(1)
    assert e["eta_s"] == pytest.approx(3 * e["elapsed_s"], abs=0.15)


def test_a_full_disk_is_said_once_and_stops_nothing(tmp_path, monkeypatch):
    store, events, logs = Store(str(tmp_path / "store")), [], []

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_put", full)
    watch = StageProgress(context(store, events=events, logs=logs), total=4, every_s=0)
    for step in range(3):
        watch.update(step)
    assert [e["step"] for e in events] == [0, 1, 2]  # the parent still hears of every step
    assert len(logs) == 1 and "progress file not written (the stage goes on)" in logs[0] and "space" in logs[0]


def test_other_ranks_report_nothing(tmp_path):
    store, events = Store(str(tmp_path / "store")), []
    assert StageProgress(context(store, rank=1, events=events), total=4).update(4, force=True) is None
    assert events == [] and read_progress(store, "base_train", "k" * 64) is None


def test_tracking_changes_no_stage_key_and_travels_outside_the_sections():
    plain = load_config("tiny")
    watched = load_config("tiny", ["tracking.wandb_mode=offline", "tracking.wandb_entity=someone",
                                   "tracking.wandb_dir=/tmp/x"])
    ups = {s: {"stage": s, "files": []} for s in STAGES}
    for stage in STAGES:
        assert compute_key(plain, stage, ups) == compute_key(watched, stage, ups), stage
    assert watched.tracking.wandb_mode == "offline" and "tracking" not in plain.section("base_train")


def test_a_wandb_project_without_wandb_installed_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking: .*wandb_project is set but wandb is not installed.*nanopipe\[wandb\]"):
        load_config("tiny", ["tracking.wandb_project=demo"])
    assert load_config("tiny").tracking.wandb_project is None  # off by default: no wandb needed


# ----- W&B offline: a local run dir holding what was logged -----

def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file: a LevelDB-style log of
    protobuf records (32 KiB blocks, 7-byte record headers) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    data, pos, part, rows = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # padding to the end of the block
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")} | {"_step": record.history.step.num})
    return rows


def offline_runs(where) -> list[str]:
    return sorted(glob.glob(f"{where}/wandb/offline-run-*"))


def test_wandb_offline_run_keeps_the_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from nanopipe.config import TrackingConfig
    from nanopipe.tracking import start_tracking

    monkeypatch.setenv("WANDB_SILENT", "true")
    assert start_tracking(TrackingConfig(), "base_train", "k" * 64, {}) is None  # off: nothing starts
    cfg = TrackingConfig(wandb_project="nanopipe-test", wandb_mode="offline", wandb_dir=str(tmp_path))
    tracker = start_tracking(cfg, "base_train", "a1" * 32, {"depth": 2})
    for step in range(3):
        tracker.log({"loss": 5.0 - step, "lrm": 1.0, "note": "text", "bad": math.nan}, step)
    tracker.log({"val_bpb": 2.5}, 3)
    tracker.finish()
    (run_dir,) = offline_runs(tmp_path)
    assert run_dir.endswith("-base_train-a1a1a1a1a1a1a1a1")  # the run id: stage and key, so a resume continues it
    rows = wandb_history(run_dir)
    assert [(r["_step"], r.get("loss"), r.get("val_bpb")) for r in rows] == [(0, 5, None), (1, 4, None), (2, 3, None),
                                                                             (3, None, 2.5)]
    assert all("note" not in r and "bad" not in r for r in rows)  # numbers only, and finite


# ----- Prefect: events -> the progress and live table artifacts (the API calls, counted) -----

def test_live_artifacts_update_in_place_rate_limited_and_end_at_100(monkeypatch):
    import flows.stages as fs

    calls = []
    monkeypatch.setattr(fs, "create_progress_artifact", lambda p, key, description: calls.append(("create", key, p)) or "P")
    monkeypatch.setattr(fs, "update_progress_artifact", lambda i, p, description: calls.append(("update", i, p)))
    monkeypatch.setattr(fs, "create_table_artifact", lambda t, key, description: calls.append(("table", key, t)) or "T")

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def update_artifact(self, i, update):
            calls.append(("table-update", i, json.loads(update.data)))

    monkeypatch.setattr(fs, "get_client", lambda sync_client: Client())
    warnings = []
    live = fs.LiveArtifacts("base_train", SimpleNamespace(warning=warnings.append), every_s=3600)

    def event(step, **metrics):
        return {"stage": "base_train", "key": "k" * 64, "step": step, "total": 10, "percent": 10.0 * step,
                "eta_s": 5.0, "elapsed_s": 1.0, "metrics": metrics, "updated_at": "now"}

    live(event(0))
    live(event(3, loss=4.2, tokens_per_s=1000.0))  # within every_s: kept for the table, not published
    live(event(5, loss=3.9, val_bpb=2.1, tokens_per_s=1100.0))
    assert [c[0] for c in calls] == ["create", "table"] and calls[0][1:] == ("base-train-progress", 0.0)
    live.finish()  # the stage committed before a 100% event came
    assert calls[-2] == ("update", "P", 100.0)
    kind, _, rows = calls[-1]
    assert kind == "table-update" and [r["step"] for r in rows] == [5, 3, 0]  # newest first
    assert list(rows[0]) == ["step", "loss", "val_bpb", "tokens_per_s"] and rows[1]["val_bpb"] == ""
    assert "step 10/10" in fs.describe_progress({**event(10, loss=3.9), "eta_s": 0.0})

    def down(*a, **k):
        raise ConnectionError("API down")

    monkeypatch.setattr(fs, "update_progress_artifact", down)
    live(event(10))
    live(event(10))  # a failing API is a warning, once, never an exception into the training's output loop
    assert len(warnings) == 1 and "API down" in warnings[0]
