"""bench/gpu_check.py's CPU path, so the one-GPU check cannot rot between GPU hours: every check runs
at a tiny shape, and the memory estimator of `nanopipe plan` is held against measured CPU peaks."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_path_runs_every_check_and_the_memory_estimate_holds():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    print(p.stdout)  # the measured figures, in the test log
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "resumed step loss" in out and ": same" in out
    assert "weights finite: True" in out and "all checks passed" in out
    # the estimator against the resident-set peak of real training steps, at each shape: within 25%
    errors = [int(e) for e in re.findall(r"\[memory\] .* vs measured peak .* GB \(([+-]\d+)%\)", out)]
    assert len(errors) == 2 and all(abs(e) <= 25 for e in errors), out
    result = out.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT gpu=cpu d20_tokens_per_s=\d+ mfu=- peak_gb=[\d.]+ plan_peak_gb=[\d.]+ "
                        r"decode_b1=\d+ decode_b32=\d+", result), result
