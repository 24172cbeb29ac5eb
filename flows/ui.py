"""`nanopipe ui` / `make ui`: a local Prefect server with nanopipe's pools, deployments and workers.

    python -m flows.ui [--host 127.0.0.1] [--port 4200] [--store URL]

starts, in order: a Prefect server (SQLite under $PREFECT_HOME) on 127.0.0.1, the work pools and
concurrency limits of deployments/pools.yaml, `prefect deploy --all` (prefect.yaml), and one
process worker per pool; then prints the UI URL and waits. Ctrl-C (or SIGTERM) stops every
process it started, workers first, and the flow runs they started. Logs go to
$PREFECT_HOME/ui/*.log.

    python -m flows.ui --apply-only [--store URL]

applies pools.yaml and deploys against an existing server ($PREFECT_API_URL), e.g. a shared one
that GPU hosts' workers poll.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from nanopipe.launch import kill_trees

REPO = Path(__file__).resolve().parents[1]
POOLS_FILE = REPO / "deployments" / "pools.yaml"
SERVER_START_TIMEOUT_S = 120
STOP_GRACE_S = 10


class UIError(RuntimeError):
    pass


def _prefect() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def _env(api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of every process started here: no telemetry, the repo as PWD (prefect.yaml's pull step)."""
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PWD=str(REPO), **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


# ----- pools, limits, deployments -----

def load_pools(path: Path = POOLS_FILE) -> dict:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("pools"), dict) or not spec["pools"]:
        raise UIError(f"{path}: expected a `pools:` mapping of pool name -> settings")
    for name, pool in spec["pools"].items():
        if not isinstance(pool, dict) or not isinstance(pool.get("env", {}), dict):
            raise UIError(f"{path}: pools.{name} must be a mapping with an optional `env` mapping")
    limits = spec.get("concurrency_limits") or {}
    if not all(isinstance(v, int) and v >= 0 for v in limits.values()):
        raise UIError(f"{path}: concurrency_limits must map names to slot counts (integers >= 0)")
    return spec


def pool_template(env: dict[str, str]) -> dict:
    """The process worker's base job template, with `env` defaults for every flow run of the pool."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {k: str(v) for k, v in env.items()}
    return template


def apply_pools(api_url: str, store: str | None = None, path: Path = POOLS_FILE) -> dict:
    """Create or update the pools and global concurrency limits of pools.yaml on the server at api_url.

    store: a store URL every flow run of the pools gets as NANOPIPE_STORE (None: workers' own env).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = load_pools(path)
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name, pool in spec["pools"].items():
            env = dict(pool.get("env") or {}, **({"NANOPIPE_STORE": store} if store else {}))
            client.create_work_pool(WorkPoolCreate(name=name, type="process", description=pool.get("description"),
                                                   base_job_template=pool_template(env)), overwrite=True)
        for name, limit in (spec.get("concurrency_limits") or {}).items():
            client.upsert_global_concurrency_limit_by_name(name, limit)
    return spec


def deploy(api_url: str, log_path: Path | None = None) -> None:
    """`prefect deploy --all` from the repo root, against api_url."""
    p = subprocess.run([*_prefect(), "--no-prompt", "deploy", "--all"], cwd=REPO, env=_env(api_url),
                       capture_output=True, text=True, timeout=600)
    if log_path:
        log_path.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise UIError(f"`prefect deploy --all` failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")


# ----- processes -----

def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200 and json.loads(r.read()) is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _spawn(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log = open(log_path, "ab")
    # Own session: a Ctrl-C in the terminal reaches only us, and we stop the children in order.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc


def start_server(host: str, port: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    api_url = f"http://{host}:{port}/api"
    log = log_dir / "server.log"
    # The UI's own API address must follow --port, or the page talks to the default :4200.
    proc = _spawn([*_prefect(), "server", "start", "--host", host, "--port", str(port)], log,
                  _env(PREFECT_UI_API_URL=f"http://{host}:{port}/api"))
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not healthy(api_url):
        if proc.poll() is not None:
            raise UIError(f"the Prefect server exited with code {proc.returncode}; {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            stop([proc])
            raise UIError(f"the Prefect server did not answer at {api_url} within {SERVER_START_TIMEOUT_S}s; "
                          f"{log}:\n{_tail(log)}")
        time.sleep(0.5)
    return proc, api_url


def start_worker(pool: str, api_url: str, log_dir: Path, **env: str) -> subprocess.Popen:
    """A process worker polling `pool`; its flow runs inherit its environment (plus the pool's env)."""
    return _spawn([*_prefect(), "worker", "start", "--pool", pool, "--type", "process",
                   "--name", f"nanopipe-{pool}-{socket.gethostname()}"], log_dir / f"worker-{pool}.log",
                  _env(api_url, **env))


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop(procs: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group (and every descendant), then SIGKILL what is left after `grace` s."""
    kill_trees(procs, grace)


# ----- the command -----

def ui_main(host: str = "127.0.0.1", port: int = 4200, store: str | None = None,
            pools_file: Path = POOLS_FILE) -> None:
    """Start everything, print the UI URL, wait for Ctrl-C / SIGTERM (or a child dying), stop everything."""
    spec = load_pools(pools_file)
    if not port_free(host, port):
        raise UIError(f"{host}:{port} is already in use (another Prefect server?); pass --port")
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    log_dir = home / "ui"
    log_dir.mkdir(parents=True, exist_ok=True)
    started: dict[str, subprocess.Popen] = {}  # stopped in this order: workers, then the server

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"starting Prefect server on {host}:{port} (database and logs under {home}) ...", flush=True)
        server, api_url = start_server(host, port, log_dir)
        started["server"] = server
        apply_pools(api_url, store, pools_file)
        print(f"work pools: {', '.join(spec['pools'])}; concurrency limits: "
              f"{', '.join(f'{k}={v}' for k, v in (spec.get('concurrency_limits') or {}).items()) or 'none'}", flush=True)
        deploy(api_url, log_dir / "deploy.log")
        print("deployments registered (prefect.yaml)", flush=True)
        workers = {f"worker {pool}": start_worker(pool, api_url, log_dir) for pool in spec["pools"]}
        started = {**workers, **started}
        ui_url = f"http://{host}:{port}"
        print(f"\nPrefect UI: {ui_url}\n  API: {api_url}\n  store: {store or os.environ.get('NANOPIPE_STORE') or 'default'}"
              f"\n  logs: {log_dir}\nCtrl-C stops the server and the workers.", flush=True)
        while True:
            dead = {name: p.returncode for name, p in started.items() if p.poll() is not None}
            if dead:
                raise UIError(f"{', '.join(f'{n} (exit {c})' for n, c in dead.items())} stopped on its own; "
                              f"see the logs in {log_dir}")
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        if started:
            print("stopping the workers and the server ...", flush=True)
            stop(list(started.values()))
            print("stopped.", flush=True)
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.ui", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--store", default=None, help="store URL for every flow run of the pools (NANOPIPE_STORE)")
    ap.add_argument("--apply-only", action="store_true",
                    help="only apply pools.yaml and deploy, against $PREFECT_API_URL")
    a = ap.parse_args(argv)
    try:
        if a.apply_only:
            from prefect.settings import PREFECT_API_URL

            api_url = PREFECT_API_URL.value()
            if not api_url:
                raise UIError("--apply-only needs PREFECT_API_URL (e.g. http://host:4200/api)")
            apply_pools(api_url, a.store)
            deploy(api_url)
            print(f"pools and deployments applied to {api_url}")
        else:
            ui_main(a.host, a.port, a.store)
    except UIError as e:
        print(f"nanopipe ui: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
