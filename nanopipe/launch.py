"""Run a training/eval module as a subprocess (usually under torchrun), or a server beside the caller.

Every child starts in a session of its own and is tied to this process's life:

- the kernel SIGKILLs it when the thread that started it dies (PR_SET_PDEATHSIG, Linux), so a
  SIGKILLed caller (a flow run's engine, a `nanopipe run` killed with its process group) leaves
  no child behind; the ranks torchrun starts do the same towards torchrun (``die_with_parent``),
  so a killed torchrun takes its ranks along;
- on timeout, Ctrl-C or any exception in the caller, its process group and every descendant
  (torchrun's ranks sit in sessions of their own) get SIGTERM, then SIGKILL;
- ``terminate_all`` stops every child this process runs, from any thread: flows/ calls it when
  a flow run is cancelled, and the caller then gets ``LaunchCancelled``.

Output is streamed line by line to a callback (flows/ passes a Prefect logger) and teed to a log
file. No Prefect here: flows/ wraps this.
"""

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


class LaunchCancelled(LaunchError):
    """The child was stopped by ``terminate_all`` (its flow run was cancelled)."""


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


# ----- children tied to this process -----

PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _pdeathsig() -> None:
    """preexec_fn of every child: the kernel SIGKILLs it when the thread that started it ends. That
    thread waits for the child (run_streaming, background), so in effect: when this process dies.
    Only an already-resolved C call here: this runs between fork and exec."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent() -> None:
    """For a process another program started (a torchrun rank): be SIGKILLed when that parent
    dies, and exit now if it already has (this process was reparented before getting here)."""
    if _prctl is None:
        return
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


@dataclass
class _Child:
    proc: subprocess.Popen
    stopped: str | None = None  # why terminate_all stopped it


_running: dict[int, _Child] = {}  # pid -> every child started here that has not been waited for yet
_running_lock = threading.Lock()


def _start(cmd: list[str], env: dict | None, cwd) -> _Child:
    """Popen in a session of its own (its group can be killed whole), dying with this process."""
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}  # unbuffered: lines arrive as printed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=child_env, cwd=cwd, text=True, encoding="utf-8",
                            errors="replace", preexec_fn=_pdeathsig if _prctl else None)
    child = _Child(proc)
    with _running_lock:
        _running[proc.pid] = child
    return child


def _forget(child: _Child) -> None:
    with _running_lock:
        _running.pop(child.proc.pid, None)


def terminate_all(reason: str, grace: float = KILL_GRACE_S) -> list[int]:
    """Stop every child this process runs (from any thread): SIGTERM to its process group and every
    descendant now, SIGKILL to what is left after `grace` s. The thread that waits for a child gets
    LaunchCancelled(reason). Returns the pids of the children stopped."""
    with _running_lock:
        children = [c for c in _running.values() if c.stopped is None]
        for c in children:
            c.stopped = reason
    for c in children:
        threading.Thread(target=kill_trees, args=([c.proc], grace), name="launch-terminate", daemon=True).start()
    return [c.proc.pid for c in children]


def descendants(pid: int) -> list[int]:
    """Every process below pid, children first (torchrun's ranks sit in sessions of their own)."""
    try:
        ps = subprocess.Popen(["ps", "-A", "-o", "pid=,ppid="], stdout=subprocess.PIPE, text=True)
        out = ps.communicate(timeout=10)[0]
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and int(parts[0]) != ps.pid:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            found.append(c)
            todo.append(c)
    return found


def signal_pid(pid: int, sig: int, group: bool = False) -> None:
    """Send `sig` to a process (or its group); one that is gone already is fine."""
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_trees(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each child's process group and its descendants (torchrun forwards SIGTERM to its
    ranks), then SIGKILL whatever is left after `grace` seconds (one deadline for all)."""
    family = {p.pid: descendants(p.pid) for p in procs}  # while the children live: orphans are no longer found
    for p in procs:
        signal_pid(p.pid, signal.SIGTERM, group=True)
        for pid in family[p.pid]:
            signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    # Even if a leader exited, workers that ignored SIGTERM may still be in the group or below it.
    for p in procs:
        signal_pid(p.pid, signal.SIGKILL, group=True)
        for pid in family[p.pid]:
            signal_pid(pid, signal.SIGKILL)
        p.wait()


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
    whole process group is killed before the exception propagates; LaunchCancelled when
    ``terminate_all`` stopped it.
    """
    cmd = [str(c) for c in cmd]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    deadline = None if timeout is None else time.monotonic() + timeout

    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(cmd)}\n")
        log.flush()
        child = _start(cmd, env, cwd)
        proc = child.proc
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
                    kill_trees([proc], kill_grace)
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
                            kill_trees([proc], 0)
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
            kill_trees([proc], kill_grace)
            if not isinstance(exc, LaunchTimeout):
                log.write(f"=== interrupted by {type(exc).__name__}; process group killed\n")
            raise
        finally:
            _forget(child)
            reader.join(timeout=1.0)
            if not reader.is_alive():
                proc.stdout.close()
        returncode = proc.returncode
        if child.stopped:
            message = f"{' '.join(cmd)} was stopped: {child.stopped}"
            log.write(f"=== {message}\n")
            raise LaunchCancelled(message, returncode, list(tail))
        if returncode != 0:
            message = f"{' '.join(cmd)} {_describe_exit(returncode)}"
            log.write(f"=== {message}\n")
            raise LaunchError(f"{message}; last {len(tail)} lines of {log_path}:\n" + "".join(tail),
                              returncode, list(tail))


@contextmanager
def background(cmd: list[str], log_path: str | os.PathLike, on_line: Callable[[str], None] = print,
               env: dict | None = None, cwd=None, kill_grace: float = KILL_GRACE_S) -> Iterator[subprocess.Popen]:
    """Run `cmd` (a server) beside the caller for the duration of the block: its output is streamed to
    `on_line` (from a reader thread) and appended to `log_path`; leaving the block, however, kills
    its process group. Raises LaunchCancelled, whatever the block raised, when ``terminate_all``
    stopped the child."""
    cmd = [str(c) for c in cmd]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n")
        log.flush()
        child = _start(cmd, env, cwd)

        def read() -> None:
            for line in child.proc.stdout:
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))

        reader = threading.Thread(target=read, name="background-reader", daemon=True)
        reader.start()
        try:
            yield child.proc
        except BaseException:
            if child.stopped:
                raise LaunchCancelled(f"{' '.join(cmd)} was stopped: {child.stopped}", child.proc.returncode, []) from None
            raise
        finally:
            kill_trees([child.proc], kill_grace)
            _forget(child)
            reader.join(timeout=5.0)
        if child.stopped:
            raise LaunchCancelled(f"{' '.join(cmd)} was stopped: {child.stopped}", child.proc.returncode, [])
