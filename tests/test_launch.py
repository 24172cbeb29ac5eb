import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nanopipe import runner
from nanopipe.config import load_config
from nanopipe.launch import (MALLOC_ENV, TRAINING_ENV, LaunchCancelled, LaunchError, LaunchTimeout, background,
                             descendants, run_streaming, terminate_all, torchrun_command, training_env)
from nanopipe.store import Store

ROOT = Path(__file__).resolve().parents[1]
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its (re)parent to reap it counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_gone(pid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # don't leave it behind for the rest of the suite
    pytest.fail(f"process {pid} outlived run_streaming")


# A child that starts a grandchild (which ignores SIGTERM, so only SIGKILL ends it),
# prints the grandchild's pid, then does `after`.
SPAWNER = """
import signal, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"])
print("grandchild", g.pid, flush=True)
{after}
"""


def grandchild_pid(lines: list[str]) -> int:
    return int(next(line for line in lines if line.startswith("grandchild")).split()[1])


def test_streams_lines_and_tees_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    got = []
    run_streaming(python("""
        import os, sys
        print("first")
        print("to stderr", file=sys.stderr)
        print("var", os.environ["NANOPIPE_TEST_VAR"])
    """), log, on_line=got.append, env={"NANOPIPE_TEST_VAR": "42"})
    assert got == ["first", "to stderr", "var 42"]
    text = log.read_text()
    assert "first\nto stderr\nvar 42\n" in text and text.startswith("=== ")
    run_streaming(python("print('second run')"), log, on_line=got.append)
    assert "var 42" in log.read_text() and log.read_text().endswith("second run\n")  # appended


def test_failure_raises_with_tail(tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(LaunchError) as info:
        run_streaming(python("""
            import sys
            for i in range(100):
                print(f"line {i}")
            sys.exit(3)
        """), log, on_line=lambda line: None)
    err = info.value
    assert err.returncode == 3 and "exited with code 3" in str(err)
    assert "line 99" in str(err) and "line 60\n" in str(err) and "line 59\n" not in str(err)
    assert len(err.tail) == 40
    assert "line 0\n" in log.read_text() and "exited with code 3" in log.read_text()


def test_death_by_signal_is_named(tmp_path):
    with pytest.raises(LaunchError, match="killed by SIGTERM") as info:
        run_streaming(python("import os, signal; print('bye', flush=True); os.kill(os.getpid(), signal.SIGTERM)"),
                      tmp_path / "run.log", on_line=lambda line: None)
    assert info.value.returncode == -signal.SIGTERM and info.value.tail == ["bye\n"]


def test_timeout_kills_whole_process_group(tmp_path):
    got = []
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match="timed out after 3s"):
        run_streaming(python(SPAWNER.format(after="time.sleep(600)")), tmp_path / "run.log",
                      on_line=got.append, timeout=3, kill_grace=0.5)
    assert time.monotonic() - start < 10
    assert "ready" in got  # the grandchild was up, ignoring SIGTERM, when the timeout hit
    assert_gone(grandchild_pid(got))


def test_exception_in_caller_kills_group_and_propagates(tmp_path):
    got = []

    def on_line(line):
        got.append(line)
        if line == "ready":
            raise KeyboardInterrupt  # what a cancelled task sees in its thread

    with pytest.raises(KeyboardInterrupt):
        run_streaming(python(SPAWNER.format(after="time.sleep(600)")), tmp_path / "run.log",
                      on_line=on_line, kill_grace=0.5)
    assert_gone(grandchild_pid(got))
    assert "interrupted by KeyboardInterrupt" in (tmp_path / "run.log").read_text()


def test_leftover_holding_the_pipe_does_not_hang(tmp_path):
    got = []
    start = time.monotonic()
    run_streaming(python(SPAWNER.format(after="time.sleep(0.5)")), tmp_path / "run.log",
                  on_line=got.append, timeout=30, kill_grace=0.5)
    assert time.monotonic() - start < 10
    assert_gone(grandchild_pid(got))


def test_torchrun_command_argv():
    py = sys.executable
    assert torchrun_command("nanopipe.train.base", ["--store", "/s", "--key", "k"], nproc_per_node=2) == [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "nanopipe.train.base", "--store", "/s", "--key", "k"]
    assert torchrun_command("m", [], nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500",
                            standalone=False) == [
        py, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
        "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29500", "-m", "m"]
    with pytest.raises(ValueError, match="standalone=False"):
        torchrun_command("m", [], nnodes=2, node_rank=1, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("m", [], nnodes=2, standalone=False)
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_command("m", [], nnodes=2, node_rank=2, rdzv_endpoint="h:1", standalone=False)
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_command("m", [], nproc_per_node=0)


@pytest.mark.e2e
def test_real_torchrun_two_ranks(tmp_path):
    (tmp_path / "allreduce_probe.py").write_text(textwrap.dedent("""
        import sys
        import torch
        import torch.distributed as dist
        from nanopipe import distcheck
        dist.init_process_group("gloo")
        distcheck.install_if_requested()  # the suite's environment asks for strict collectives
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        # one write per line: torchrun runs workers with -u, and print() issues text and "\\n"
        # as separate writes, so lines of two ranks could interleave
        sys.stdout.write(f"rank {rank} of {world} sum {t.item():g} args {sys.argv[1:]} strict {distcheck.installed()}\\n")
        dist.destroy_process_group()
    """))
    got = []
    run_streaming(torchrun_command("allreduce_probe", ["--x", "1"], nproc_per_node=2), tmp_path / "run.log",
                  on_line=got.append, timeout=60, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    for rank in range(2):
        assert f"rank {rank} of 2 sum 3 args ['--x', '1'] strict True" in got


# Allocate, touch and free 64 MiB; report how much of it the process still holds (MiB).
KEPT_AFTER_FREE = """
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024
before = rss()
b = b"x" * (64 << 20); del b
print("kept", rss() - before)
"""


def test_training_env_keeps_what_the_user_set(monkeypatch):
    for k in TRAINING_ENV:
        monkeypatch.delenv(k, raising=False)
    assert training_env() == {**MALLOC_ENV, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "7")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert training_env() == {"MALLOC_TRIM_THRESHOLD_": MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]}


def test_torchrun_stages_launch_with_the_training_env(tmp_path, monkeypatch):
    """Every torchrun stage starts with training_env(): the CUDA allocator setting included (torch reads
    it when CUDA starts), or the value the user exported."""
    envs = []
    monkeypatch.setattr(runner, "run_streaming", lambda cmd, log_path, on_line, env: envs.append(env))
    for user_value in (None, "max_split_size_mb:512"):
        if user_value:
            monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_value)
        else:
            monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        with pytest.raises(runner.StageError, match="committed no manifest"):  # nothing ran
            runner.launch_child(Store(str(tmp_path / "store")), load_config("tiny"), "base_train", "0" * 64, {},
                                log=lambda line: None)
    assert envs[0]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in envs[1]  # the child inherits the user's value


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="MALLOC_ENV tunes glibc's malloc")
def test_training_env_reuses_freed_memory(tmp_path, monkeypatch):
    """The point of MALLOC_ENV: a freed large block stays in the heap for reuse, not returned to the
    kernel (whence it would be faulted in and zeroed again on the next allocation)."""
    for k in MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    kept_mib = {}
    for name, env in (("default", None), ("training", training_env())):
        out = []
        run_streaming(python(KEPT_AFTER_FREE), tmp_path / f"{name}.log", on_line=out.append, env=env)
        kept_mib[name] = int(out[-1].split()[1])
    assert kept_mib["default"] < 16, kept_mib
    assert kept_mib["training"] >= 60, kept_mib


def test_terminate_all_stops_children_from_another_thread(tmp_path):
    """What flows/ does when a flow run is cancelled: the waiting thread gets LaunchCancelled at once."""
    got = []

    def on_line(line):
        got.append(line)
        if line == "ready":
            threading.Thread(target=terminate_all, args=("flow run cancelled",), kwargs={"grace": 0.5}).start()

    start = time.monotonic()
    with pytest.raises(LaunchCancelled, match="stopped: flow run cancelled"):
        run_streaming(python(SPAWNER.format(after="time.sleep(600)")), tmp_path / "run.log", on_line=on_line)
    assert time.monotonic() - start < 30
    assert_gone(grandchild_pid(got))  # it ignored SIGTERM: SIGKILLed after the grace
    assert terminate_all("again") == []  # nothing of ours left running


def test_background_child_lives_for_the_block_only(tmp_path):
    got = []
    with background(python("import time; print('up', flush=True); time.sleep(600)"), tmp_path / "bg.log",
                    on_line=got.append, kill_grace=0.5) as proc:
        deadline = time.monotonic() + 30
        while "up" not in got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == ["up"] and proc.poll() is None
    assert_gone(proc.pid)
    assert "up\n" in (tmp_path / "bg.log").read_text()
    with pytest.raises(LaunchCancelled, match="stopped: cancelled"):
        with background(python("import time; time.sleep(600)"), tmp_path / "bg.log", kill_grace=0.5) as proc:
            terminate_all("cancelled", grace=0.5)
            proc.wait(10)
            raise ConnectionError("the server went away")  # what the block sees; the cancellation wins


# A parent that launches `cmd` through run_streaming (in a thread, as a Prefect task runs) and waits.
PARENT = """
import threading, time
from nanopipe.launch import run_streaming
threading.Thread(target=run_streaming, args=({cmd!r}, {log!r}), daemon=True,
                 kwargs={{"on_line": lambda line: None, "cwd": {cwd!r}}}).start()
time.sleep(600)
"""


def family_of_killed_parent(tmp_path, cmd: list[str], ready) -> list[int]:
    """Start PARENT over `cmd`; once ready(pids below it) holds, SIGKILL it (as a worker kills a flow
    run's engine) and return the processes that were below it, children first."""
    code = PARENT.format(cmd=cmd, log=str(tmp_path / "p.log"), cwd=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 120
    try:
        while not ready(family := descendants(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert ready(family), family
    return family


@LINUX
def test_child_dies_with_a_killed_parent(tmp_path):
    child, grandchild = family_of_killed_parent(tmp_path, python(SPAWNER.format(after="time.sleep(600)")),
                                                lambda family: len(family) == 2)
    assert_gone(child)  # PR_SET_PDEATHSIG
    os.kill(grandchild, signal.SIGKILL)  # a plain grandchild: nothing ties it to the child


@LINUX
@pytest.mark.e2e
def test_torchrun_and_its_ranks_die_with_a_killed_parent(tmp_path):
    """torchrun starts each rank in a session of its own, so a process-group kill misses them;
    torchrun dies with its parent, and ranks that call die_with_parent die with torchrun."""
    (tmp_path / "rank_probe.py").write_text(textwrap.dedent("""
        import os, time
        from nanopipe.launch import die_with_parent
        die_with_parent()
        open(f"rank{os.environ['RANK']}.pid", "w").write(str(os.getpid()))
        time.sleep(600)
    """))
    ranks = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    torchrun, *below = family_of_killed_parent(tmp_path, torchrun_command("rank_probe", [], nproc_per_node=2),
                                               lambda family: all(p.exists() for p in ranks))
    rank_pids = [int(p.read_text()) for p in ranks]
    assert set(rank_pids) <= set(below)
    for pid in [torchrun, *rank_pids]:
        assert_gone(pid, within=10)
