"""Run untrusted Python (code a model wrote) in a separate, locked-down process.

Two layers. The outer one is the operating system's, through bubblewrap (`bwrap`):

  user     its own user namespace, uid/gid 65534 inside; when the server runs as root the
           sandbox is started as uid 65534 outside too (a real unprivileged user, so
           RLIMIT_NPROC applies); every capability dropped, no new privileges, no further
           user namespaces
  view     a fresh root holding only a read-only view of what the interpreter needs (the
           Python install's binary and standard library, /usr/lib), a private tmpfs /tmp of
           TMP_BYTES and a minimal /dev; no /proc, no /work, no /root, no store, no home
  network  its own network namespace: no interface but a down loopback
  process  its own PID, IPC and UTS namespaces and session; it dies with its parent, and when
           its first process ends the kernel kills everything it started
  syscalls a seccomp filter (compiled with libseccomp) refuses sockets, ptrace, mounts,
           namespaces, keyrings, BPF, io_uring, mknod and the like from the start; once the
           interpreter is up a second filter refuses exec and fork (threads still work)
  limits   RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0; the parent kills the
           whole sandbox at the wall-clock deadline and stops reading its pipes then, whoever
           holds them

The inner layer is in-process (`python -I -S -B`, empty environment): a PEP 578 audit hook
refuses files outside the standard library, writes, sockets, subprocesses, ctypes and imports
off the allow-list, so mistakes get a clear error. A hostile program can switch that layer off
(the hook's function is reachable from Python); the outer layer is what contains it.
Where bubblewrap is missing or cannot create namespaces, `isolation()` says so once, loudly,
and only the inner layer runs.

Verdicts (`run_tests`, HumanEval's harness): the program and its tests never share a process.
The sandbox's first process forks: the child runs the program and answers calls to the entry
point over a pipe with plain data (marshal); the parent runs the trusted test code against a
proxy of the function, and only then reads a per-call nonce from a pipe the child never held
and writes it with the verdict. Exiting, raising SystemExit, crashing or printing a fake
status in the program can only make the calls fail.

`calculator(expr)` is the much smaller tool nanochat's engine uses for <<expr>> style calls:
arithmetic and str.count on literals, evaluated from the AST (no eval), in process.
"""

import ast
import errno
import functools
import json
import logging
import math
import operator
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The program may import these. HumanEval's prompts and tests need typing, math, re, string,
# collections, copy, random and hashlib; the rest are the usual pure-computation modules.
DEFAULT_ALLOWED_IMPORTS = frozenset({
    "math", "cmath", "re", "json", "itertools", "functools", "collections", "string", "datetime",
    "fractions", "decimal", "statistics", "random", "heapq", "bisect", "typing", "operator",
    "copy", "hashlib", "dataclasses", "enum", "textwrap", "numbers", "array", "unicodedata",
    "time", "calendar", "abc",
})

# Harmless stdlib helpers that allowed modules load lazily on the program's behalf
# (str.encode("utf-16") loads encodings.utf_16; datetime.strptime loads _strptime, which loads locale).
_HELPER_IMPORTS = frozenset({"encodings", "_strptime", "locale", "_locale", "calendar"})

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 256
MAX_OUTPUT_CHARS = 64 * 1024  # per stream; the rest is dropped (the result says so)
MAX_PROCESSES = 32  # RLIMIT_NPROC: processes and threads of the sandbox uid (shared by sandboxes running at once as root)
MAX_FILE_BYTES = 1 << 20  # RLIMIT_FSIZE: the largest file it may write (in its private /tmp)
TMP_BYTES = 16 << 20  # size of the private tmpfs /tmp
SANDBOX_UID = 65534  # nobody
_ERROR_CHARS = 1000

# Refused from the start (bwrap loads this filter before it starts the interpreter).
_DENIED_SYSCALLS = (
    "socket", "socketpair", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
    "pivot_root", "chroot", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "open_by_handle_at",
    "name_to_handle_at", "iopl", "ioperm", "syslog", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "mknod", "mknodat", "pidfd_getfd", "fanotify_init", "move_mount", "fsopen",
    "fsmount", "fspick", "open_tree", "mount_setattr", "personality", "vhangup",
)
# Refused once the interpreter is up and before the program runs: no new programs, no processes.
_DENIED_AFTER_START = ("execve", "execveat", "fork", "vfork")
_CLONE_THREAD = 0x00010000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME: no new namespaces
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)


@dataclass
class ExecResult:
    ok: bool  # run_python: the program ran to the end without an exception (sys.exit(0) counts as ok);
    #           run_tests: the tests passed, as the trusted side saw it
    stdout: str
    stderr: str
    error: str | None  # short "ExcType: message", or why the process ended, None when ok
    timed_out: bool = False  # wall-clock timeout or CPU-time limit
    memory_exceeded: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# -----------------------------------------------------------------------------
# The outer layer: what this machine offers, found once


@dataclass(frozen=True)
class Isolation:
    bwrap: str | None  # the bwrap binary, when it works here
    seccomp: bool  # libseccomp compiled our filters
    missing: tuple[str, ...]  # what is missing, in words (empty: fully isolated)

    @property
    def available(self) -> bool:
        return self.bwrap is not None


def _interpreter() -> str:
    """The base interpreter (not the venv's launcher): the child needs only its stdlib."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def _read_only_paths() -> tuple[str, ...]:
    """What the interpreter needs, outermost first: its binary, its stdlib and shared library
    (as the base interpreter itself reports them: never a venv's site-packages) and the
    system's shared libraries."""
    probe = ("import json, sys, sysconfig; "
             "print(json.dumps([p for p in sys.path if p] + [sysconfig.get_config_var('LIBDIR') or '']))")
    out = subprocess.run([_interpreter(), "-I", "-S", "-c", probe], capture_output=True, text=True, env={},
                         timeout=60, check=True).stdout
    paths = {_interpreter()} | {os.path.realpath(p) for p in json.loads(out) if p}
    paths |= {p for p in ("/usr/lib", "/usr/lib64", "/lib", "/lib64") if os.path.isdir(p) and not os.path.islink(p)}
    kept: list[str] = []
    for p in sorted(paths, key=len):  # drop what an outer path already covers
        if os.path.exists(p) and not any(p == k or p.startswith(k + os.sep) for k in kept):
            kept.append(p)
    return tuple(kept)


@functools.lru_cache(maxsize=1)
def _seccomp_programs() -> tuple[bytes, bytes] | None:
    """(filter loaded by bwrap, filter the child loads after start) as BPF, or None without libseccomp."""
    try:
        import pyseccomp as sc
    except Exception:  # not installed, or libseccomp.so.2 missing: the caller says so
        return None

    def compile_(rules) -> bytes:
        f = sc.SyscallFilter(sc.ALLOW)  # other architectures' syscalls (int 0x80) kill the process
        for name, args, action in rules:
            try:
                f.add_rule(action, name, *args)
            except (OSError, ValueError, RuntimeError):
                pass  # not a syscall on this architecture
        with tempfile.TemporaryFile() as t:
            f.export_bpf(t)
            t.seek(0)
            return t.read()

    eperm = sc.ERRNO(errno.EPERM)
    start = [(name, (), eperm) for name in _DENIED_SYSCALLS]
    start += [("clone", (sc.Arg(0, sc.MASKED_EQ, flag, flag),), eperm) for flag in _NAMESPACE_FLAGS]
    after = [(name, (), eperm) for name in _DENIED_AFTER_START]
    after.append(("clone", (sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0),), eperm))  # a process, not a thread
    after.append(("clone3", (), sc.ERRNO(errno.ENOSYS)))  # flags sit in memory: make libc fall back to clone
    try:
        return compile_(start), compile_(after)
    except (OSError, ValueError, RuntimeError):
        return None


def _privileged() -> bool:
    """Root starts bwrap privileged and the child drops to SANDBOX_UID itself: a real
    unprivileged uid outside too (a user namespace of root's would map to root, whom
    RLIMIT_NPROC does not limit)."""
    return os.geteuid() == 0


def _bwrap_argv(bwrap: str, seccomp_fd: int | None) -> list[str]:
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--dev", "/dev", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    if _privileged():  # the bootstrap needs these two to drop to SANDBOX_UID; it loses them with it
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    for link in ("/lib", "/lib64", "/bin"):
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
    made: set[str] = set()
    for path in _read_only_paths():
        # parents made world-traversable (bwrap would copy e.g. /root's 0700 from the host)
        parents = [p for p in _ancestors(path) if p not in made and not os.path.islink(p)]
        for p in parents:
            argv += ["--perms", "0755", "--dir", p]
        made.update(parents)
        argv += ["--ro-bind", path, path]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--"]


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _seccomp_pipe(program: bytes) -> int:
    r, w = os.pipe()
    os.write(w, program)  # a few hundred bytes: fits the pipe buffer
    os.close(w)
    return r


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Find bubblewrap and libseccomp and check they work here (once per process; a warning
    naming what is missing when they do not)."""
    missing = []
    bwrap = shutil.which("bwrap")
    programs = _seccomp_programs()
    if programs is None:
        missing.append("libseccomp (pip package pyseccomp + Debian libseccomp2): no seccomp filter")
    if bwrap is None:
        missing.append("bubblewrap (Debian package `bubblewrap`, command `bwrap`): no OS isolation")
    else:
        r = _spawn([_interpreter(), "-I", "-S", "-c", "pass"], programs, timeout=30)
        if r.returncode != 0:
            missing.append(f"bubblewrap cannot build a sandbox here ({r.stderr.decode(errors='replace').strip()[-200:]}; "
                           "user namespaces may be disabled): no OS isolation")
            bwrap = None
    iso = Isolation(bwrap, programs is not None, tuple(missing))
    if missing:
        log.warning("nanopipe sandbox: %s. Model-written code then runs with in-process hooks only, which a "
                    "hostile program can switch off.", "; ".join(missing))
    return iso


def _spawn(cmd: list[str], programs, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` once inside a bwrap sandbox (the detection probe)."""
    seccomp_fd = _seccomp_pipe(programs[0]) if programs else None
    try:
        return subprocess.run(_bwrap_argv(shutil.which("bwrap"), seccomp_fd) + cmd, capture_output=True,
                              pass_fds=() if seccomp_fd is None else (seccomp_fd,), env={}, cwd="/", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 1, b"", str(e).encode())
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)


# -----------------------------------------------------------------------------
# The child's bootstrap. It reads its settings and the program from stdin as one JSON object.

_CHILD = r'''
import builtins, json, marshal, os, resource, signal, struct, sys, traceback
cfg = json.loads(sys.stdin.buffer.read())
sys.stdin = None
os.close(0)
if cfg["uid"] is not None:  # privileged bwrap: become the unprivileged user (all capabilities go with root)
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
status_fd = cfg["status_fd"]
os_write, os_read, os_exit = os.write, os.read, os._exit  # saved before the program can replace them

allowed = frozenset(cfg["allowed"])
for name in sorted(allowed):
    try:
        __import__(name)  # loaded now, while imports are unrestricted; their deps come along
    except ImportError:
        pass
loadable = allowed | frozenset(cfg["helpers"])
read_roots = tuple(os.path.realpath(p) + os.sep for p in sys.path if p)
lib_roots = read_roots + tuple(os.path.abspath(p) + os.sep for p in sys.path if p) + ("<frozen ",)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED_PREFIXES = ("socket.", "subprocess.", "_posixsubprocess.", "ctypes.", "shutil.", "tempfile.",
                    "pty.", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
                    "imaplib.", "nntplib.", "telnetlib.", "sqlite3.", "mmap.", "resource.", "syslog.",
                    "fcntl.", "glob.", "winreg.", "msvcrt.", "_winapi.", "os.", "signal.", "gc.", "sys.setprofile",
                    "sys.settrace", "sys.addaudithook")
READ_EVENTS = ("os.listdir", "os.scandir")

def readable(path):
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return isinstance(path, str) and (os.path.realpath(path) + os.sep).startswith(read_roots)

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(flags, int) and flags & WRITE_FLAGS) or (isinstance(mode, str) and set(mode) & set("wax+")):
            raise PermissionError(f"sandbox: writing files is not allowed ({path!r})")
        if not readable(path):
            raise PermissionError(f"sandbox: reading files is not allowed ({path!r})")
    elif event in READ_EVENTS:
        if args and not readable(args[0] if args[0] is not None else "."):
            raise PermissionError(f"sandbox: listing directories is not allowed ({args[0]!r})")
    elif event == "import":
        if args[0].partition(".")[0] not in loadable:
            raise ImportError(f"sandbox: import of {args[0]!r} is not allowed")
    elif event.startswith(BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")

real_import = builtins.__import__
user_importable = allowed | frozenset(cfg["helpers"])
def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # the caller is the program unless it is standard-library code (allowed modules import freely)
    if not sys._getframe(1).f_code.co_filename.startswith(lib_roots):
        top = name.partition(".")[0]
        if level != 0 or top not in user_importable:
            raise ImportError(f"sandbox: import of {name!r} is not allowed")
    return real_import(name, globals, locals, fromlist, level)

def load_seccomp(program):
    import ctypes
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(program, len(program))
    prog = Fprog(len(program) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):  # NO_NEW_PRIVS, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "sandbox: loading the seccomp filter failed")
    for name in ("ctypes", "ctypes._endian", "_ctypes"):
        sys.modules.pop(name, None)

def lock_down():
    mem = cfg["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a blocked write then fails with an error, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
    for program in cfg["seccomp"]:
        load_seccomp(bytes.fromhex(program))
    sys.addaudithook(audit)
    builtins.__import__ = guarded_import

def run(code, namespace):
    """Run code; the status dict (the program's exception, if any, printed to stderr)."""
    try:
        exec(compile(code, "<sandbox>", "exec"), namespace)
    except MemoryError:
        namespace.clear()  # free what the program held so reporting can allocate
        return {"ok": False, "error": "MemoryError: memory limit exceeded", "memory": True}
    except SystemExit as e:
        if e.code not in (None, 0):
            return {"ok": False, "error": f"SystemExit: {e.code}"[:cfg["error_chars"]], "memory": False}
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's first frame
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:cfg["error_chars"]], "memory": False}
    return {"ok": True, "error": None, "memory": False}

def flush():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass

def send(fd, data):
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os_write(fd, data):]

def recv(fd):
    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = os_read(fd, n - len(out))
            if not chunk:
                return None
            out += chunk
        return out
    head = exactly(4)
    return None if head is None else exactly(struct.unpack("<I", head)[0])

if cfg["mode"] == "run":
    lock_down()
    status = run(cfg["code"], {"__name__": "__main__", "__builtins__": builtins})
    flush()
    os_write(status_fd, json.dumps(status).encode())
else:
    # run_tests: the program in a child process answering calls; the tests here, trusted
    calls_r, calls_w = os.pipe()
    answers_r, answers_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (status_fd, cfg["nonce_fd"], calls_w, answers_r):
            os.close(fd)
        lock_down()
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        status = run(cfg["code"], namespace)
        function = namespace.get(cfg["entry_point"])
        if status["ok"] and not callable(function):
            status = {"ok": False, "error": f"NameError: the program defines no function {cfg['entry_point']!r}"}
        flush()
        send(answers_w, marshal.dumps(("ready" if status["ok"] else "failed", status["error"])))
        while status["ok"] and (call := recv(calls_r)) is not None:
            args, kwargs = marshal.loads(call)
            try:
                answer = ("value", function(*args, **kwargs))
            except BaseException as e:  # SystemExit included: the call failed
                answer = ("raised", f"{type(e).__name__}: {e}"[:cfg["error_chars"]])
            flush()
            try:
                data = marshal.dumps(answer)
            except ValueError:
                data = marshal.dumps(("raised", "TypeError: the function returned something that is not plain data"))
            send(answers_w, data)
        os_exit(0)
    os.close(calls_r)
    os.close(answers_w)
    nonce = os_read(cfg["nonce_fd"], 64).decode()  # only now: the program's process never held it
    os.close(cfg["nonce_fd"])
    lock_down()

    class ProgramFailed(Exception):
        pass

    def answer():
        data = recv(answers_r)
        if data is None:
            raise ProgramFailed("the program's process ended")
        kind, value = marshal.loads(data)
        if kind != "value":
            raise ProgramFailed(value)
        return value

    def candidate(*args, **kwargs):
        send(calls_w, marshal.dumps((args, kwargs)))
        return answer()

    try:
        kind, error = marshal.loads(recv(answers_r) or marshal.dumps(("failed", "the program's process ended")))
        if kind != "ready":
            raise ProgramFailed(error)
        tests = {"__name__": "__tests__", "__builtins__": builtins}
        exec(compile(cfg["prelude"], "<prelude>", "exec"), tests)
        tests[cfg["entry_point"]] = candidate  # tests may call the function by its name
        exec(compile(cfg["tests"], "<tests>", "exec"), tests)
        tests["check"](candidate)
        status = {"ok": True, "error": None, "memory": False}
    except ProgramFailed as e:
        status = {"ok": False, "error": str(e), "memory": "MemoryError" in str(e)}
    except BaseException as e:
        status = {"ok": False, "error": (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:cfg["error_chars"]],
                  "memory": isinstance(e, MemoryError)}
    os.close(calls_w)
    flush()
    os_write(status_fd, json.dumps({**status, "nonce": nonce}).encode())
'''


# -----------------------------------------------------------------------------
# The parent side


def _check_args(code, timeout, memory_mb, allowed_imports) -> list[str]:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):
        raise ValueError(f"timeout must be in (0, 3600] seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 32):
        raise ValueError(f"memory_mb must be an int >= 32 (the interpreter itself needs ~30 MB), got {memory_mb!r}")
    allowed = sorted(set(allowed_imports))
    bad = [m for m in allowed if not (isinstance(m, str) and m.isidentifier())]
    if bad:
        raise ValueError(f"allowed_imports must be top-level module names, got {bad}")
    return allowed


def run_python(code: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
               allowed_imports=DEFAULT_ALLOWED_IMPORTS, max_output_chars: int = MAX_OUTPUT_CHARS) -> ExecResult:
    """Run `code` as a script in a fresh sandboxed interpreter and report what happened.

    timeout: wall-clock seconds for the whole run (interpreter start included); the CPU-time
    limit is the same number, rounded up. memory_mb: address-space limit of the child.
    """
    allowed = _check_args(code, timeout, memory_mb, allowed_imports)
    return _execute({"mode": "run", "code": code}, allowed, timeout, memory_mb, max_output_chars)


def run_tests(program: str, tests: str, entry_point: str, prelude: str = "", timeout: float = DEFAULT_TIMEOUT_S,
              memory_mb: int = DEFAULT_MEMORY_MB, allowed_imports=DEFAULT_ALLOWED_IMPORTS,
              max_output_chars: int = MAX_OUTPUT_CHARS) -> ExecResult:
    """Run `program`, then the trusted `tests` (which define check(candidate)) against its
    function `entry_point`, in separate processes of one sandbox (see the module docstring).
    ok is True only if check() returned; `prelude` (trusted, e.g. the task's prompt with its
    helper functions) runs on the tests' side first. Arguments and results cross as plain data."""
    allowed = _check_args(program, timeout, memory_mb, allowed_imports)
    for name, value in (("tests", tests), ("prelude", prelude)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise ValueError(f"entry_point must be a function name, got {entry_point!r}")
    cfg = {"mode": "tests", "code": program, "tests": tests, "prelude": prelude, "entry_point": entry_point}
    return _execute(cfg, allowed, timeout, memory_mb, max_output_chars)


def _execute(cfg: dict, allowed: list[str], timeout: float, memory_mb: int, max_output_chars: int) -> ExecResult:
    iso = isolation()
    programs = _seccomp_programs()
    child_filters = [] if programs is None else [p for p in (programs[1:] if iso.available else programs) if p]
    fds: list[int] = []  # ours, closed once the child has them

    def pipe() -> tuple[int, int]:
        r, w = os.pipe()
        fds.extend((r, w))
        return r, w

    status_r, status_w = pipe()
    nonce_r, nonce_w = pipe()
    nonce = secrets.token_hex(16)
    os.write(nonce_w, nonce.encode())
    cfg = {**cfg, "allowed": allowed, "helpers": sorted(_HELPER_IMPORTS), "status_fd": status_w, "nonce_fd": nonce_r,
           "memory_bytes": memory_mb * 1024 * 1024, "cpu_seconds": max(1, math.ceil(timeout)),
           "file_bytes": MAX_FILE_BYTES, "processes": MAX_PROCESSES, "error_chars": _ERROR_CHARS,
           "seccomp": [p.hex() for p in child_filters], "uid": SANDBOX_UID if iso.available and _privileged() else None}
    argv = [_interpreter(), "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _CHILD]
    pass_fds = [status_w, nonce_r]
    if iso.available:
        seccomp_fd = _seccomp_pipe(programs[0]) if programs is not None else None
        if seccomp_fd is not None:
            fds.append(seccomp_fd)
            pass_fds.append(seccomp_fd)
        argv = _bwrap_argv(iso.bwrap, seccomp_fd) + argv
    os.close(nonce_w)
    fds.remove(nonce_w)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=pass_fds, env={}, cwd="/", start_new_session=True)
    finally:
        for fd in fds:
            if fd != status_r:
                os.close(fd)
    with os.fdopen(status_r, "rb") as status_file:
        streams, killed = _communicate(proc, json.dumps(cfg).encode(), status_file, timeout,
                                       {"stdout": max_output_chars * 4, "stderr": max_output_chars * 4, "status": 1 << 16})

    def text(name: str) -> str:
        data, dropped = streams[name]
        s = data.decode("utf-8", errors="replace")
        if len(s) > max_output_chars or dropped:
            s = s[:max_output_chars] + f"\n[output truncated: more than {max_output_chars} characters]"
        return s

    stdout, stderr = text("stdout"), text("stderr")
    status = None
    try:
        status = json.loads(streams["status"][0]) if streams["status"][0] else None
    except json.JSONDecodeError:
        pass
    if cfg["mode"] == "tests" and status is not None and status.get("nonce") != nonce:
        status = None  # not written by the harness
    rc = proc.returncode
    # RLIMIT_CPU sends SIGXCPU, then SIGKILL a second later: only possible once that much time has passed
    cpu_killed = not killed and (rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (
        rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and time.monotonic() - started >= cfg["cpu_seconds"]))
    if killed or (cpu_killed and status is None):
        why = f"wall-clock timeout after {timeout:g}s" if killed else f"CPU time limit of {cfg['cpu_seconds']}s"
        return ExecResult(False, stdout, stderr, f"Timeout: {why}", timed_out=True)
    if status is not None and rc == 0:
        return ExecResult(bool(status.get("ok")), stdout, stderr, status.get("error"),
                          memory_exceeded=bool(status.get("memory")))
    # died without reporting: a crash, or memory ran out where Python could not recover
    memory = "MemoryError" in stderr or rc in (-signal.SIGSEGV, 128 + signal.SIGSEGV)
    if rc < 0:
        why = f"killed by signal {signal.Signals(-rc).name}"
    elif rc > 128 and iso.available:  # bwrap reports a signal-killed child as 128 + signal
        why = f"killed by signal {signal.Signals(rc - 128).name}" if rc - 128 in signal.valid_signals() else f"exited with code {rc}"
    else:
        why = f"exited with code {rc}"
    if status is None and rc == 0:
        why = "ended without a valid status" + (" (no verdict from the tests)" if cfg["mode"] == "tests" else "")
    return ExecResult(False, stdout, stderr, ("MemoryError: " if memory else "") + f"process {why}",
                      memory_exceeded=memory)


def _communicate(proc: subprocess.Popen, stdin: bytes, status_file, timeout: float, limits: dict[str, int]):
    """Feed stdin, read stdout/stderr/status (keeping up to limits[name] bytes each) until the
    process ends, and never past the deadline: then the whole sandbox is killed and pipes that
    someone still holds are abandoned. -> ({name: (bytes, dropped)}, killed)."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    kept = {name: bytearray() for name in limits}
    dropped = dict.fromkeys(limits, 0)
    for name, f in (("stdout", proc.stdout), ("stderr", proc.stderr), ("status", status_file)):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ, name)
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    pending = memoryview(stdin)
    killed = False
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # it ended; whatever still holds a pipe is not waited for
            if now >= deadline:
                killed = proc.poll() is None
                _kill(proc)
                break
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                name = key.data
                if name == "stdin":
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = limits[name] - len(kept[name])
                kept[name] += chunk[:max(room, 0)]
                dropped[name] += max(0, len(chunk) - max(room, 0))
    finally:
        sel.close()
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        _kill(proc)
        proc.stdout.close()
        proc.stderr.close()
    return {name: (bytes(kept[name]), dropped[name]) for name in limits}, killed


def _kill(proc: subprocess.Popen) -> None:
    """Kill the sandbox's process group (bwrap; the kernel then kills its PID namespace) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# -----------------------------------------------------------------------------
# The calculator tool: arithmetic on literals, evaluated from the syntax tree

MAX_EXPR_CHARS = 500
_MAX_INT_BITS = 4096  # 10**1233: far past any sensible answer, far below slow big-int territory
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _NotCalculable(Exception):
    pass


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _NotCalculable(f"not a number: {value!r}")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _NotCalculable("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotCalculable("not finite")
    return value


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _number(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 128 or abs(left) > 1e12):
            raise _NotCalculable("power too large")
        return _number(_BINOPS[type(node.op)](left, right))
    # 'strawberry'.count('r'): the one string operation (SpellingBee's tool call)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.func.value.value.count(node.args[0].value)
    raise _NotCalculable(f"unsupported syntax: {type(node).__name__}")


def format_number(value: int | float) -> str:
    """How tool outputs print numbers: 5.0 -> "5", 0.1 + 0.2 -> "0.3" (10 significant digits)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".10g")
    return str(value)


def calculator(expr: str) -> str | None:
    """Evaluate a calculator tool call; the result as text, or None if it is not one.

    Accepts + - * / // % ** (small powers only), parentheses, int/float literals with
    thousands separators ("1,000"), and "'word'.count('x')". Never runs code.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # 1,000 -> 1000 (not inside strings)
    try:
        return format_number(_eval(ast.parse(expr, mode="eval")))
    except (_NotCalculable, SyntaxError, ArithmeticError, ValueError, RecursionError, MemoryError):
        return None
