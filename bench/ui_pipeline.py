"""The pipeline as a user of the UI runs it: `nanopipe ui`, then Run on `pipeline/full`, twice.

    python bench/ui_pipeline.py [--preset tiny] [--burners N] [--set k=v ...]

Starts `python -m flows.ui` (a Prefect server, the pools, the deployments and a worker per pool)
in a fresh PREFECT_HOME with a fresh store, starts N CPU-bound processes beside it (default: one
per core: a loaded machine), triggers `pipeline/full` through the API as the Run button does and
waits for it, then triggers it again (every stage Cached). Stops everything it started.
Last line: RESULT cold_s=<> cached_s=<> cached_vs_cold=<> burners=<>
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tmp: str, port: int, env: dict) -> subprocess.Popen:
    log = open(f"{tmp}/ui.out", "w")
    ui = subprocess.Popen([sys.executable, "-m", "flows.ui", "--port", str(port), "--store", f"{tmp}/store"],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while "Prefect UI:" not in Path(f"{tmp}/ui.out").read_text():
        if ui.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"`nanopipe ui` did not come up:\n{Path(f'{tmp}/ui.out').read_text()[-3000:]}")
        time.sleep(1)
    return ui


def trigger(preset: str, overrides: list[str]) -> tuple[float, object, dict[str, str]]:
    """Run pipeline/full through the API and wait; (wall s, final state, stage -> state name)."""
    from prefect.deployments import run_deployment

    from flows.pipeline import task_states

    t0 = time.time()
    fr = run_deployment("pipeline/full", parameters={"preset": preset, "overrides": overrides}, timeout=None)
    return time.time() - t0, fr.state, task_states(fr.id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--burners", type=int, default=os.cpu_count(), help="CPU-bound processes beside the run")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="np-ui-bench-") as tmp:
        port = free_port()
        env = dict(os.environ, PREFECT_HOME=f"{tmp}/prefect", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
        os.environ.update(PREFECT_HOME=env["PREFECT_HOME"], PREFECT_API_URL=env["PREFECT_API_URL"])
        t0 = time.time()
        ui = start_ui(tmp, port, env)
        print(f"# nanopipe ui up in {time.time() - t0:.1f}s (port {port})", flush=True)
        burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(a.burners)]
        try:
            walls = []
            for what in ("cold", "cached"):
                wall, state, states = trigger(a.preset, a.overrides)
                print(f"# {what}: {state.name} in {wall:.1f}s; " + ", ".join(f"{k} {v}" for k, v in states.items()),
                      flush=True)
                if not state.is_completed():
                    sys.exit(f"pipeline/full ended {state.name}: {state.message}")
                walls.append(wall)
        finally:
            for b in burners:
                b.kill()
                b.wait()
            ui.send_signal(signal.SIGTERM)  # it stops its workers (and their flow runs) and the server
            ui.wait(timeout=120)
    cold, cached = walls
    print(f"RESULT cold_s={cold:.1f} cached_s={cached:.1f} cached_vs_cold={cached / cold:.3f} burners={a.burners}")


if __name__ == "__main__":
    main()
