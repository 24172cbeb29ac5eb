"""Shared test fixtures: a project-local Prefect home, one Prefect server per session, stores, the
small-but-real config overrides the stage tests build with, and edits of the source the code
identity reads."""

import glob
import os
import pathlib
import socket
import subprocess
import time

import pytest

from nanopipe.distcheck import STRICT_ENV

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "tests"))
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["NANOPIPE_RETRIES"] = "0"  # tests inject failures; retrying them would only slow the suite
# Multi-rank tests run on gloo; their children (torchrun, mp.spawn) inherit this and check every
# collective as NCCL would (nanopipe/distcheck.py).
os.environ[STRICT_ENV] = "1"

# Small but real: the offline sample text, a 512-token vocab, shards of 256 documents.
SMALL = ["tokenizer.vocab_size=512", "tokenizer.max_chars=400000", "tokenizer.heldout_docs=20",
         "data.source.max_chars=1500000", "data.docs_per_shard=256", "data.row_group_size=64"]
# A one-layer base model, 8 steps of 512 tokens, checkpoints every 4 steps.
TRAIN = ["base_train.depth=1", "base_train.head_dim=32", "base_train.sequence_len=64",
         "base_train.device_batch_size=4", "base_train.total_batch_size=512", "base_train.num_iterations=8",
         "base_train.checkpoint_every=4", "base_train.eval_every=4", "base_train.eval_tokens=512",
         "base_train.threads=1"]

# A base_train that would run for many minutes (over the small data many times), checkpointing every 10
# steps, on two ranks: the cancel and kill tests stop it midway (and its rerun, once it has resumed).
LONG_TRAIN = TRAIN + ["base_train.num_iterations=5000", "base_train.allow_data_repeat=true",
                      "base_train.checkpoint_every=10", "base_train.eval_every=0", "base_train.nproc_per_node=2"]


def sets(overrides) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def stage_processes(store_url: str) -> list[int]:
    """Every live process working for a stage of this store: torchrun and its ranks (their command
    lines name the store: `-m nanopipe.runner --store URL ...`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")
            state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and "nanopipe.runner" in args and store_url in args:
            found.append(int(entry))
    return sorted(found)


def ps(pids) -> str:
    """`ps` lines of these processes (for the test log), or a note that none is left."""
    if not pids:
        return "(no process left)"
    return subprocess.run(["ps", "-ww", "-o", "pid,ppid,pgid,sid,stat,etime,args", "-p", ",".join(map(str, pids))],
                          capture_output=True, text=True).stdout.rstrip()


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    """check()'s first truthy value within `timeout` seconds, else fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def stage_dir(store_url: str, overrides, stage: str) -> str | None:
    """The dir of `stage` for preset tiny with `overrides`, once its upstream is built (None before)."""
    from nanopipe.config import load_config
    from nanopipe.runner import committed, compute_key
    from nanopipe.stages import STAGES
    from nanopipe.store import Store

    store, cfg = Store(store_url), load_config("tiny", list(overrides))
    built = committed(store, cfg, [u for u in STAGES if u in STAGES[stage]])
    if not all(u in built for u in STAGES[stage]):
        return None
    return store.stage_dir(stage, compute_key(cfg, stage, {u: built[u] for u in STAGES[stage]}))


def checkpoint_steps(stage_dir: str | None) -> list[int]:
    """Steps of the complete checkpoints in an unfinished stage dir's _work/."""
    return sorted(int(p.split("ckpt_")[1].split("/")[0]) for p in glob.glob(f"{stage_dir}/_work/ckpt_*/COMPLETE"))


def resumed_at(stage_dir: str | None) -> int | None:
    """The step the newest launch of the stage resumed at (from its launch.log), or None."""
    try:
        text = open(f"{stage_dir}/launch.log").read().rsplit("=== ", 1)[-1]
    except OSError:
        return None
    said = text.split("resumed from checkpoint at step ")
    return int(said[1].split()[0]) if len(said) > 1 else None


def commit_chat_model(store) -> dict:
    """A committed tokenizer and an "sft" model built from it (test_engine's random model), in `store`:
    the upstream of the serve stage. Returns {"tokenizer": manifest, "sft": manifest}."""
    from nanopipe.train.common import save_model
    from test_engine import random_model, train_tokenizer

    w = store.writer("tokenizer", "a" * 64)
    for name, data in train_tokenizer().to_files().items():
        w.write_bytes(name, data)
    ups = {"tokenizer": w.commit(config={}, upstream={}, code_version="test", metrics={}, started_at=time.time())}
    w = store.writer("sft", "b" * 64)
    save_model(w, random_model())  # the server finds the model's tokenizer through its lineage
    ups["sft"] = w.commit(config={}, upstream={"tokenizer": ups["tokenizer"]}, code_version="test", metrics={},
                          started_at=time.time())
    return ups


@pytest.fixture(scope="session")
def prefect_server():
    """A real local Prefect server (prefect's test harness), shared by the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on 127.0.0.1 (moto's server mode), started and stopped here."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = url
    yield url
    server.stop()
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty store: a local dir, or a bucket on the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    import s3fs

    bucket = f"np-{os.urandom(4).hex()}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}/store"


@pytest.fixture
def edited_source(monkeypatch):
    """edit(module, change): the code identity reads change(text) for that real module; the tree is
    never written. Each call replaces the previous edit."""
    from nanopipe import codeid

    real = codeid.read_source

    def edit(module: str, change) -> None:
        path = codeid.module_path(module)
        monkeypatch.setattr(codeid, "read_source",
                            lambda p: change(real(p).decode()).encode() if p == path else real(p))
        codeid._stage_identity.cache_clear()

    yield edit
    codeid._stage_identity.cache_clear()
