"""Schema honesty: schemathesis fuzzes the live server from its own OpenAPI document (an API key
set, small limits so each generation is short) and finds no 5xx, no undocumented status code or
content type, and no response that breaks its documented schema."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanopipe.engine import Engine
from nanopipe.serve.app import Limits, Security, create_app
from test_serve import live_server
from test_engine import random_model, train_tokenizer

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection")
KEY = "fuzz-key"


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (pip install -e .[dev])")
def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path):
    limits = Limits(max_tokens=8, default_max_tokens=8, max_samples=2, max_messages=4, max_message_chars=200,
                    max_total_chars=400)
    app = create_app(Engine(random_model(), train_tokenizer(), max_batch=4), model_name="fuzzed", max_queue=8,
                     limits=limits, security=Security(api_keys=(KEY,)))
    with live_server(app) as url:
        run = subprocess.run([str(SCHEMATHESIS), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
                              "--checks", CHECKS, "--max-examples", "10", "--seed", "1", "--no-color",
                              "--request-timeout", "60", "--suppress-health-check", "all"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache goes there
    cases = re.search(r"^\s*(\d+) generated, (.*)$", run.stdout, re.M)
    summary = [line.strip("= ") for line in run.stdout.splitlines() if line.startswith("=") and " in " in line]
    print(f"\nschemathesis: {cases.group(0).strip() if cases else '?'} | {summary[-1] if summary else '?'}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert cases and int(cases.group(1)) > 100 and "failed" not in cases.group(2), run.stdout[-3000:]
