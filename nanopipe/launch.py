"""Run a training/eval module as a subprocess (usually under torchrun).

The child runs in its own process group, so on timeout, Ctrl-C or cancellation
of the caller the whole group (torchrun and every worker it spawned) is
terminated, not just the direct child. Output is streamed line by line to a
callback (flows/ passes a Prefect logger) and teed to a log file.
No Prefect here: flows/ wraps this.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

TAIL_LINES = 40
KILL_GRACE_S = 10.0  # SIGTERM -> SIGKILL; torchrun forwards SIGTERM to its workers
DRAIN_S = 2.0  # after the child exits, how long leftovers may hold our pipe open

# glibc malloc maps large blocks (activations, logits: above its mmap threshold, at most
# 32 MiB) afresh and unmaps them on free, so each training step re-faults and re-zeroes
# gigabytes of pages: a third of CPU time on this machine type. Serving them from a heap
# that is never trimmed reuses the memory instead (about 1.5x tokens/s for the depth-6 model
# on CPU; bench/train.py --system-malloc shows the difference). glibc reads these at process
# start, so they go into the child's environment; settings a user exported win.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# CUDA's caching allocator: segments that grow in place rather than fixed-size blocks, so batches
# of varying shape (evaluation, chat rows) fragment GPU memory less. nanochat's scripts set the same.
# Read when CUDA is first used; a CPU run ignores it.
CUDA_ALLOC_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
TRAINING_ENV = {**MALLOC_ENV, **CUDA_ALLOC_ENV}


def training_env() -> dict[str, str]:
    """Variables to start a training/eval child with: TRAINING_ENV, except those already set here."""
    return {k: v for k, v in TRAINING_ENV.items() if k not in os.environ}


class LaunchError(RuntimeError):
    """The child failed: non-zero exit, killed by a signal, or timed out."""

    def __init__(self, message: str, returncode: int | None, tail: list[str]):
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail


class LaunchTimeout(LaunchError):
    """The child ran past its timeout and was killed."""


def torchrun_command(module: str, args: list[str], nproc_per_node: int = 1, nnodes: int = 1,
                     node_rank: int = 0, rdzv_endpoint: str | None = None, standalone: bool = True) -> list[str]:
    """argv for `torchrun ... -m module args`, run with this interpreter."""
    if not module:
        raise ValueError("torchrun_command: module must be a non-empty module name")
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"torchrun_command: nproc_per_node and nnodes must be >= 1, got {nproc_per_node}, {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"torchrun_command: node_rank must be in [0, {nnodes}), got {node_rank}")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if standalone:
        if nnodes > 1 or rdzv_endpoint is not None:
            raise ValueError("torchrun_command: standalone is single-node; for nnodes > 1 or an "
                             "rdzv_endpoint pass standalone=False")
        cmd += ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        if not rdzv_endpoint:
            raise ValueError("torchrun_command: standalone=False needs rdzv_endpoint='host:port'")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    return cmd + ["-m", module, *[str(a) for a in args]]


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        # Even if the leader exited, workers that ignored SIGTERM may still be in the group.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit code {returncode})"
    return f"exited with code {returncode}"


def run_streaming(cmd: list[str], log_path: str | os.PathLike, on_line: Callable[[str], None] = print,
                  timeout: float | None = None, env: dict | None = None, cwd=None,
                  kill_grace: float = KILL_GRACE_S) -> None:
    """Run `cmd`, stream its merged stdout/stderr to `on_line` and append it to `log_path`.

    env: variables set on top of this process's environment (None: inherit as is).
    Raises LaunchError (with the last lines of output) on a non-zero exit or death by
    signal, LaunchTimeout after `timeout` seconds. On timeout or any exception raised
    in the caller while waiting (KeyboardInterrupt, task cancellation) the child's
    whole process group is killed before the exception propagates.
    """
    cmd = [str(c) for c in cmd]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}  # unbuffered: lines arrive as printed
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    deadline = None if timeout is None else time.monotonic() + timeout

    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=child_env, cwd=cwd,
                                text=True, encoding="utf-8", errors="replace")
        # A reader thread, so the caller's thread can enforce the deadline and see cancellation.
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, name="launch-reader", daemon=True)
        reader.start()
        eof, exited_at, leftovers_killed = False, None, False
        try:
            while not (eof and proc.poll() is not None):
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    _kill_group(proc, kill_grace)
                    message = f"{' '.join(cmd)} timed out after {timeout:g}s and was killed"
                    log.write(f"=== {message}\n")
                    raise LaunchTimeout(f"{message}; last {len(tail)} lines of {log_path}:\n" + "".join(tail),
                                        proc.returncode, list(tail))
                wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
                if eof:  # output closed, child not yet exited
                    try:
                        proc.wait(timeout=wait)
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                try:
                    line = lines.get(timeout=wait)
                except queue.Empty:
                    if proc.poll() is not None:
                        exited_at = exited_at or now
                        if now - exited_at > DRAIN_S and not leftovers_killed:
                            # The child is gone but processes it left behind still hold the pipe.
                            _kill_group(proc, 0)
                            leftovers_killed = True
                    continue
                if line is None:
                    eof = True
                    continue
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                tail.append(line + "\n")
                on_line(line)
        except BaseException as exc:
            # Timeout, Ctrl-C, cancellation, a failing callback: never leave the group running.
            _kill_group(proc, kill_grace)
            if not isinstance(exc, LaunchTimeout):
                log.write(f"=== interrupted by {type(exc).__name__}; process group killed\n")
            raise
        finally:
            reader.join(timeout=1.0)
            if not reader.is_alive():
                proc.stdout.close()
        returncode = proc.returncode
        if returncode != 0:
            message = f"{' '.join(cmd)} {_describe_exit(returncode)}"
            log.write(f"=== {message}\n")
            raise LaunchError(f"{message}; last {len(tail)} lines of {log_path}:\n" + "".join(tail),
                              returncode, list(tail))
