"""The serve stage inside a process that logs from many threads (a Prefect worker): its server runs
in a child process, so nothing reconfigures this process's logging."""

import logging
import threading
import uuid

import pytest
from conftest import commit_chat_model

from nanopipe.store import Store

pytestmark = pytest.mark.e2e


class FlushWaitsForAnotherThread(logging.Handler):
    """Like Prefect's API log handler: flush() waits for another thread, and that thread needs
    logging's module lock (logging.getLogger takes it). Flushed by a caller that holds that lock,
    as logging.config.dictConfig does (uvicorn's Config calls it), it deadlocks; here it gives up
    after a while and says so."""

    def __init__(self, give_up_s: float = 10.0):
        super().__init__()
        self.give_up_s = give_up_s
        self.deadlocked = False

    def emit(self, record):
        pass

    def flush(self):
        other = threading.Thread(target=logging.getLogger, args=(f"test.{uuid.uuid4().hex}",), daemon=True)
        other.start()
        other.join(self.give_up_s)
        self.deadlocked |= other.is_alive()


def test_serve_stage_does_not_touch_this_processs_logging(tmp_path):
    from nanopipe.config import ServeConfig
    from nanopipe.runner import execute

    store = Store(str(tmp_path / "store"))
    ups = commit_chat_model(store)
    handler = FlushWaitsForAnotherThread()
    logging.getLogger().addHandler(handler)
    done: dict = {}

    def serve() -> None:
        try:
            done["manifest"] = execute(store, "serve", "c" * 64, ServeConfig(max_tokens=8, concurrency=2), ups,
                                       log=lambda s: None)
        except BaseException as e:  # noqa: BLE001 - reported below
            done["error"] = e

    try:
        worker = threading.Thread(target=serve, daemon=True)  # a stage runs in a task thread of the worker
        worker.start()
        worker.join(300)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not handler.deadlocked, "the serve stage reconfigured logging in this process (deadlock)"
    assert not worker.is_alive(), "the serve stage did not finish within 300 s"
    assert "error" not in done, done.get("error")
    m = done["manifest"]
    assert m["metrics"]["model"] == "sft/" + "b" * 12 and m["metrics"]["ttft_ms"] > 0
    assert "Uvicorn running on http://127.0.0.1:" in open(store.launch_log_path("serve", "c" * 64)).read()
