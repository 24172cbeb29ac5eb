"""Shared test fixtures: a project-local Prefect home, one Prefect server per session, stores, the
small-but-real config overrides the stage tests build with, and edits of the source the code
identity reads."""

import os
import pathlib
import socket

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
