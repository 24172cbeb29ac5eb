"""Hostile programs against nanopipe.sandbox, each checked from OUTSIDE the child: a canary file
and its directory untouched, a TCP and a UDP listener on 127.0.0.1 that receive nothing, a
victim process (and this one) alive, the call back within its deadline, no sandbox process
left, secrets absent from what comes back, forged verdicts refused.

Run `python tests/test_sandbox_battery.py` for the table (case, contained, how checked).
"""

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanopipe import sandbox
from nanopipe.sandbox import SANDBOX_UID, run_python, run_tests

OS = "import typing\nsys = typing.sys\nos = sys.modules['os']\n"
# Three routes to the audit hook's function, rewritten to do nothing (and imports let through)
HOOK_OFF = {
    "_getframe": OS + (
        "f = sys._getframe(0)\n"
        "while 'audit' not in f.f_globals:\n    f = f.f_back\n"
        "f.f_globals['audit'].__code__ = (lambda event, args: None).__code__\n"
        "f.f_globals['builtins'].__import__ = f.f_globals['real_import']\n"),
    "__subclasses__": (
        "bi = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'BuiltinImporter'][0]\n"
        "sys = bi.create_module.__globals__['sys']\nos = sys.modules['os']\n"
        "g = vars(sys.modules['__main__'])\n"
        "g['audit'].__code__ = (lambda event, args: None).__code__\n"
        "g['builtins'].__import__ = g['real_import']\n"),
    "gc.get_objects": OS + (
        "gc = sys.modules['_imp'].create_builtin(sys.modules['_frozen_importlib'].ModuleSpec('gc', None))\n"
        "g = [o for o in gc.get_objects() if isinstance(o, dict) and 'audit' in o and 'real_import' in o][0]\n"
        "g['audit'].__code__ = (lambda event, args: None).__code__\n"
        "g['builtins'].__import__ = g['real_import']\n"),
}
OFF = HOOK_OFF["_getframe"]

# What a program tries once it runs. {canary}, {canary_dir}, {secret}, {port}, {victim} are filled in.
PAYLOADS = {
    "read canary": "print(open({canary!r}).read())",
    "write canary": "open({canary!r}, 'w').write('pwned')",
    "append via os.open": "fd = os.open({canary!r}, os.O_WRONLY | os.O_APPEND)\nos.write(fd, b'pwned')",
    "create file beside canary": "open({canary_dir!r} + '/new', 'w').write('x')",
    "delete canary": "os.remove({canary!r})",
    "rename canary": "os.rename({canary!r}, {canary!r} + '.moved')",
    "list canary dir": "print(os.listdir({canary_dir!r}))",
    "list / and /root and /work": "print(os.listdir('/'), os.listdir('/root'), os.listdir('/work'))",
    "stat canary": "print(os.stat({canary!r}))",
    "chmod canary": "os.chmod({canary!r}, 0o777)",
    "utime canary": "os.utime({canary!r}, (0, 0))",
    "symlink to canary": "os.symlink({canary!r}, '/tmp/l')\nprint(open('/tmp/l').read())",
    "fifo beside canary": "os.mkfifo({canary_dir!r} + '/fifo')",
    "device node": "os.mknod('/tmp/mem', 0o20600, os.makedev(1, 1))\nprint(open('/tmp/mem', 'rb').read(16))",
    "read /proc and /etc": "print(open('/proc/1/environ').read(), open('/etc/passwd').read())",
    "tcp connect listener": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')",
    "udp send listener": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))",
    "dns lookup": "import socket\nprint(socket.getaddrinfo('example.com', 80))",
    "unix socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/systemd/private')",
    "os.system": "os.system('touch {canary_dir}/system')",
    "exec /bin/sh": "os.execv('/bin/sh', ['sh', '-c', 'touch {canary_dir}/exec'])",
    "exec python": "os.execv(sys.executable, [sys.executable, '-c', 'open(%r, \"w\")' % {canary!r}])",
    "fork": "pid = os.fork()\nif pid == 0:\n    open({canary!r}, 'w').write('child')\n    os._exit(0)\nos.waitpid(pid, 0)",
    "posix_spawn": "os.posix_spawn('/bin/sh', ['sh', '-c', 'touch {canary_dir}/spawn'], {{}})",
    "subprocess": "import subprocess\nsubprocess.run(['touch', {canary_dir!r} + '/sub'])",
    "kill victim": "os.kill({victim}, signal.SIGKILL)",
    "kill parent": "os.kill(os.getppid(), signal.SIGKILL)",
    "killpg everything": "os.kill(-1, signal.SIGKILL)",
    "pidfd parent": "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    "pidfd victim": "signal.pidfd_send_signal(os.pidfd_open({victim}), signal.SIGKILL)",
    "ctypes libc": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.kill({victim}, 9)\nlibc.system(b'touch {canary_dir}/ctypes')",
    "ctypes syscall socket": "import ctypes\nlibc = ctypes.CDLL(None)\nprint('fd', libc.syscall(41, 2, 1, 0))\nassert libc.syscall(41, 2, 1, 0) < 0",
    "native module _socket": ("bs = sys.modules['_frozen_importlib_external']\n"
                              "so = [p for p in sys.path if p.endswith('lib-dynload')][0] + '/_socket' + bs.EXTENSION_SUFFIXES[0]\n"
                              "_s = sys.modules['_imp'].create_dynamic(bs.spec_from_file_location('_socket', so))\n"
                              "_s.socket().connect(('127.0.0.1', {port}))"),
    "ptrace via ctypes": "import ctypes\nassert ctypes.CDLL(None).ptrace(16, {victim}, 0, 0) == 0",
    "unshare user ns": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0",
    "setuid root": "os.setuid(0)\nopen({canary!r}, 'w')",
    "environment secrets": "print(dict(os.environ))",
}
SIGNAL = "signal = sys.modules['signal']\n"

# Each payload runs with the hooks on, and with them switched off (first route); the routes each once more.
PLAIN_CASES = [(f"{name} (hooks on)", OS + SIGNAL + code) for name, code in PAYLOADS.items()]
OFF_CASES = [(f"{name} (hook off)", OFF + SIGNAL + code) for name, code in PAYLOADS.items()]
ROUTE_CASES = [(f"hook off via {route}, then {what}", off + SIGNAL + PAYLOADS[what])
               for route, off in HOOK_OFF.items() for what in ("write canary", "tcp connect listener", "pidfd parent")]
BOMB_CASES = [
    ("fork bomb (hook off)", OFF + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
    ("thread bomb (hook off)", OFF + "import _thread, time\nfor _ in range(10000):\n    _thread.start_new_thread(time.sleep, (60,))"),
    ("memory bomb", "x = bytearray(64 * 1024 ** 3)"),
    ("memory creep", "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)"),
    ("disk bomb in /tmp (hook off)", OFF + "i = 0\nwhile True:\n    open(f'/tmp/f{{i}}', 'w').write('x' * 2 ** 20)\n    i += 1"),
    ("CPU spin", "while True:\n    pass"),
    ("sleep past the deadline, SIGTERM ignored", OFF + SIGNAL + "import time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"),
    ("setsid grandchild holding stdout (hook off)",
     OFF + "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\nprint('parent done')"),
    ("output flood", "while True:\n    print('x' * 10000)"),
    ("recursion", "def f(): return f()\nf()"),
]
# run_tests: the verdict must not be forgeable. The tests check add(2, 3) == 5; the program's add is wrong.
WRONG = "def add(a, b):\n    return a - b\n"
FORGERY_CASES = [
    ("forge: raise SystemExit before the tests", WRONG + "raise SystemExit"),
    ("forge: SystemExit(0) inside the function", "def add(a, b):\n    raise SystemExit(0)\n"),
    ("forge: os._exit(0) inside the function", OS + "def add(a, b):\n    os._exit(0)\n"),
    ("forge: fake status line then _exit", OS + WRONG + "print('{{\"ok\": true, \"error\": null}}')\nos._exit(0)"),
    ("forge: fake status on every fd then _exit", OS + WRONG + "for fd in range(1, 64):\n    try:\n"
     "        os.write(fd, b'{{\"ok\": true, \"error\": null, \"memory\": false}}')\n    except OSError:\n        pass\nos._exit(0)"),
    ("forge: hook off, status via the bootstrap's globals", OFF + WRONG + "g = vars(sys.modules['__main__'])\n"
     "g['os_write'](g['status_fd'], b'{{\"ok\": true, \"error\": null}}')\nos._exit(0)"),
    ("forge: kill the tests' process", OS + SIGNAL + "def add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"),
    ("forge: hook off, kill the tests' process", OFF + SIGNAL + "def add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"),
    ("forge: return an object equal to everything", "class Eq:\n    def __eq__(self, o): return True\n"
     "def add(a, b):\n    return Eq()\n"),
    ("forge: hook off, SIGKILL itself", OFF + SIGNAL + "def add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)\n"),
    ("forge: patch AssertionError", "import typing\ntyping.sys.modules['builtins'].AssertionError = type('X', (BaseException,), {{}})\n" + WRONG),
]
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
TIMEOUT = 3.0
SLACK = 6.0  # a loaded machine starts interpreters slowly


@dataclass
class Row:
    case: str
    contained: bool
    how: str


class World:
    """What the programs must not touch, set up and checked from outside."""

    def __init__(self, root: Path):
        self.dir = root / "canary-dir"
        self.dir.mkdir()
        self.dir.chmod(0o777)  # even a world-writable directory stays untouched
        self.canary = self.dir / "canary.txt"
        self.secret = "SECRET-" + os.urandom(8).hex()
        self.canary.write_text(self.secret)
        self.canary.chmod(0o666)
        self.victim = subprocess.Popen(["sleep", "600"])
        os.environ["NANOPIPE_TEST_SECRET"] = self.secret  # the parent's environment must not leak either

    def snapshot(self):
        st = self.canary.stat()
        return sorted(os.listdir(self.dir)), self.canary.read_text(), st.st_mtime_ns, st.st_mode

    def close(self):
        self.victim.kill()
        self.victim.wait()
        os.environ.pop("NANOPIPE_TEST_SECRET", None)


def listeners():
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    udp.setblocking(False)
    return tcp, udp


def received(tcp, udp) -> bool:
    got = False
    for sock, op in ((tcp, tcp.accept), (udp, lambda: udp.recv(64))):
        try:
            op()
            got = True
        except BlockingIOError:
            pass
        sock.close()
    return got


def run_case(world: World, name: str, code: str, forged: bool = False) -> Row:
    tcp, udp = listeners()
    fill = dict(canary=str(world.canary), canary_dir=str(world.dir), secret=world.secret,
                port=tcp.getsockname()[1], victim=world.victim.pid)
    code = code.format(**fill)
    before = world.snapshot()
    t0 = time.monotonic()
    if forged:
        r = run_tests(code, TESTS, "add", timeout=TIMEOUT, memory_mb=256)
    else:
        r = run_python(code, timeout=TIMEOUT, memory_mb=256, max_output_chars=4096)
    seconds = time.monotonic() - t0
    checks = {
        "canary untouched": world.snapshot() == before,
        "listener got nothing": not received(tcp, udp),
        "victim alive": world.victim.poll() is None,
        "no secret in output": world.secret not in (r.stdout + r.stderr + (r.error or "")),
        f"back in {seconds:.1f}s": seconds < TIMEOUT + SLACK,
    }
    if forged:
        checks["verdict: fail"] = not r.ok
    contained = all(checks.values())
    stopped = (r.error or "ran to the end").splitlines()[0][:70]
    how = ", ".join(k for k, ok in checks.items() if ok) if contained else \
        "FAILED: " + ", ".join(k for k, ok in checks.items() if not ok)
    return Row(name, contained, f"{how}; stopped by: {stopped}")


def sandbox_processes() -> list[int]:
    """Processes of the sandbox's uid, and bwrap processes, seen through /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if uid == SANDBOX_UID or cmd.startswith(b"bwrap") or b"/bwrap\0" in cmd:
            found.append(int(pid))
    return found


def run_battery(root: Path, cases=None, workers: int = 6) -> list[Row]:
    world = World(root)
    try:
        cases = cases or ([(n, c, False) for n, c in PLAIN_CASES + OFF_CASES + ROUTE_CASES + BOMB_CASES]
                          + [(n, c, True) for n, c in FORGERY_CASES])
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(lambda c: run_case(world, *c), cases))
        deadline = time.monotonic() + 10
        while sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sandbox_processes()
        rows.append(Row("afterwards: no sandbox process left", not left,
                        f"/proc scan for uid {SANDBOX_UID} and bwrap: {len(left)} found"))
        rows.append(Row("afterwards: this process alive", True, f"pid {os.getpid()} answered"))
        return rows
    finally:
        world.close()


def table(rows: list[Row]) -> str:
    lines = ["| case | contained | how checked |", "|---|---|---|"]
    lines += [f"| {r.case} | {'yes' if r.contained else 'NO'} | {r.how} |" for r in rows]
    lines.append(f"\n{sum(r.contained for r in rows)}/{len(rows)} contained")
    return "\n".join(lines)


needs_isolation = pytest.mark.skipif(not sandbox.isolation().available,
                                     reason="bubblewrap is not available: " + "; ".join(sandbox.isolation().missing))


@needs_isolation
def test_hostile_programs_are_contained(tmp_path):
    rows = run_battery(tmp_path)
    print("\n" + table(rows))
    assert len(rows) >= 100
    assert all(r.contained for r in rows), table([r for r in rows if not r.contained])


@needs_isolation
def test_os_layer_alone_contains_forks_and_grandchildren(tmp_path, monkeypatch):
    """With the after-start seccomp filter gone and the hook switched off, fork works: the PID
    namespace, RLIMIT_NPROC and the deadline must still hold."""
    start, _ = sandbox._seccomp_programs()
    monkeypatch.setattr(sandbox, "_seccomp_programs", lambda: (start, None))
    grandchild = OFF + "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\nprint('parent done')"
    bomb = OFF + ("n = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n            import time\n"
                  "            time.sleep(60)\n        n += 1\n    except OSError:\n        print('forks', n)\n        break\n")
    rows = run_battery(tmp_path, [("setsid grandchild (fork allowed)", grandchild, False),
                                  ("fork bomb (fork allowed)", bomb, False),
                                  ("fork, child writes canary (fork allowed)", OS + OFF + PAYLOADS["fork"], False)],
                       workers=1)  # one at a time: the bomb would use up the uid's RLIMIT_NPROC for the others
    print("\n" + table(rows))
    assert all(r.contained for r in rows), table(rows)
    t0 = time.monotonic()
    r = run_python(grandchild, timeout=20)  # the program ends at once: its grandchild must not hold the call
    assert r.ok and r.stdout == "parent done\n" and time.monotonic() - t0 < 10, r
    r = run_python(bomb, timeout=5)
    assert r.ok and 0 < int(r.stdout.split()[-1]) < sandbox.MAX_PROCESSES, r  # RLIMIT_NPROC stopped it


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(table(run_battery(Path(d))))
    sys.exit(0)
