"""`nanopipe status` and the run log say why a stage will (re)run: config, code or upstream outputs."""

import json

import pytest

from nanopipe import runner
from nanopipe.cli import config_status, main
from nanopipe.config import load_config
from nanopipe.runner import run_pipeline
from nanopipe.stages import STAGES
from nanopipe.store import Store

EDITED = "nanopipe.train.common"
IMPORTERS = {"base_train", "base_eval", "mid_train", "sft", "rl", "chat_eval"}  # of train.common, directly or not


@pytest.fixture
def quick(monkeypatch):
    """Every stage body replaced by one that commits a small file, in this process: the keys,
    manifests, store and status are the real ones, without the cost of training. Returns
    stage -> the bytes its body writes (change them to make a rebuild produce other outputs)."""
    real = runner.stage_module
    outputs: dict[str, bytes] = {}

    class Quick:
        LAUNCH = None  # in process, even for torchrun stages

        def __init__(self, mod):
            self._mod = mod

        def __getattr__(self, name):
            return getattr(self._mod, name)

        def run(self, ctx):
            ctx.writer.write_bytes("out.txt", outputs.get(ctx.stage, ctx.stage.encode()))
            return {}

    monkeypatch.setattr(runner, "stage_module", lambda name: Quick(real(name)))
    return outputs


@pytest.fixture
def built(tmp_path, quick):
    """A store where every stage is built for the tiny preset."""
    store = Store(str(tmp_path / "store"))
    run_pipeline(store, load_config("tiny"), list(STAGES), log=lambda s: None)
    return store


def status(store, capsys, *overrides) -> tuple[dict[str, dict], str]:
    main(["status", "--store", store.url, "--json", *[x for o in overrides for x in ("--set", o)]])
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    main(["status", "--store", store.url, *[x for o in overrides for x in ("--set", o)]])
    return rows, capsys.readouterr().out


def states(text: str) -> dict[str, str]:
    """stage -> built | stale | pending | missing, from the printed status."""
    return {line.split()[1]: line.split()[0] for line in text.splitlines()
            if line.split() and line.split()[0] in ("built", "stale", "pending", "missing")}


def test_edited_module_is_the_reason_for_exactly_its_importers_and_a_comment_changes_none(built, edited_source, capsys):
    rows, text = status(built, capsys)
    assert set(states(text).values()) == {"built"}

    edited_source(EDITED, lambda t: t + "\nEDITED_CONSTANT = 1\n")
    rows, text = status(built, capsys)
    assert {s for s, st in states(text).items() if st == "stale"} == IMPORTERS, text
    for s in IMPORTERS:
        assert rows[s]["why"]["code"]["changed"] == [EDITED]
        assert f"code: {EDITED} changed" in rows[s]["why"]["reasons"]
    assert "upstream: base_train is not built for this config (it runs first)" in rows["base_eval"]["why"]["reasons"]
    # serve and report import nothing that changed: they only wait for their upstream
    assert states(text)["serve"] == states(text)["report"] == "pending"
    assert rows["serve"]["why"]["reasons"] == ["upstream: sft is not built for this config (it runs first)"]
    assert all(states(text)[s] == "built" for s in ("setup", "tokenizer", "data"))
    assert f"code: {EDITED} changed" in text
    assert rows["base_train"]["why"]["closest"]["key"] == built.manifests("base_train")[0]["key"]

    edited_source("nanopipe.model", lambda t: "# a new comment\n" + t.replace("    def ", "\n    def "))
    rows, text = status(built, capsys)
    assert set(states(text).values()) == {"built"}, text


def test_config_change_names_the_field_and_downstream_waits(built, capsys):
    rows, text = status(built, capsys, "base_train.num_iterations=61", "base_eval.sample_prompts=[\"Hi\"]")
    assert rows["base_train"]["why"]["config"] == [{"field": "base_train.num_iterations", "old": 60, "new": 61}]
    assert "config: base_train.num_iterations 60 -> 61" in text
    assert rows["base_eval"]["why"]["config"][0]["field"] == "base_eval.sample_prompts"
    assert states(text)["mid_train"] == "pending" and states(text)["tokenizer"] == "built"


def test_changed_upstream_outputs_are_the_reason_and_never_built_says_so(tmp_path, built, quick, capsys):
    quick["tokenizer"] = b"other bytes"
    run_pipeline(built, load_config("tiny"), ["tokenizer"], force=["tokenizer"], log=lambda s: None)
    rows, text = status(built, capsys)
    assert states(text)["tokenizer"] == "built" and states(text)["data"] == "built"
    assert rows["base_train"]["why"]["upstream"][0]["stage"] == "tokenizer"
    assert "upstream: tokenizer has different outputs (rebuilt)" in rows["base_train"]["why"]["reasons"]

    empty = Store(str(tmp_path / "empty"))
    rows, text = status(empty, capsys)
    assert set(states(text).values()) == {"missing"}
    assert rows["base_train"]["why"]["reasons"] == ["never built",
                                                   "upstream: tokenizer, data are not built for this config (they run first)"]


def test_the_run_log_says_why_a_stage_runs(built, edited_source):
    edited_source(EDITED, lambda t: t + "\nEDITED_CONSTANT = 1\n")
    lines: list[str] = []
    run_pipeline(built, load_config("tiny"), ["tokenizer", "data", "base_train"], log=lines.append)
    assert f"[base_train] runs: code: {EDITED} changed" in lines
    assert not any(line.startswith(("[tokenizer] runs", "[data] runs")) for line in lines)
    run_pipeline(built, load_config("tiny"), ["setup"], force=["setup"], log=lines.append)
    assert "[setup] runs: forced" in lines


def test_an_unreadable_manifest_of_another_build_does_not_break_status(built, capsys):
    bad = built.stage_dir("base_train", "0" * 64)
    built.fs.makedirs(bad, exist_ok=True)
    built.fs.pipe_file(bad + "/manifest.json", b'{"stage": "base_tr')
    rows, text = status(built, capsys, "base_train.num_iterations=61")
    assert states(text)["base_train"] in ("stale", "missing") and states(text)["tokenizer"] == "built"
    assert rows["base_train"]["why"]["reasons"]
