"""Code identity derived from imports: what changes a stage's key, and what does not."""

import textwrap

import pytest

from nanopipe import runner
from nanopipe.codeid import module_digests, stage_code
from nanopipe.stages import STAGES


def write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def pkg(tmp_path):
    """A small package named nanopipe in tmp_path: three stages over a few library modules."""
    write(tmp_path, {
        "nanopipe/__init__.py": '"""The package."""\n__version__ = "1.0"\n',
        "nanopipe/stages/__init__.py": 'STAGES = {"a": (), "b": (), "c": ()}\n',
        "nanopipe/stages/a.py": """
            from typing import TYPE_CHECKING
            from nanopipe import x
            if TYPE_CHECKING:
                from nanopipe.runner import StageContext
            VERSION = 1
            """,
        "nanopipe/stages/b.py": """
            from nanopipe.lib.y import helper
            VERSION = 1
            """,
        "nanopipe/stages/c.py": """
            import nanopipe.z as z
            VERSION = 1
            """,
        "nanopipe/x.py": "LIMIT = 3\n",
        "nanopipe/lib/__init__.py": '"""Helpers."""\n',
        "nanopipe/lib/y.py": """
            def helper():
                from ..x import LIMIT  # lazy and relative: runs when the stage does
                return LIMIT
            """,
        "nanopipe/z.py": "import numpy\n",
        "nanopipe/runner.py": "RUNNER = 1\n",
    })
    return tmp_path


def keys(root) -> dict[str, dict[str, str]]:
    return {s: module_digests(f"nanopipe.stages.{s}", root) for s in "abc"}


def test_closure_follows_imports_direct_lazy_relative_but_not_type_checking(pkg):
    got = {s: sorted(d) for s, d in keys(pkg).items()}
    assert got == {"a": ["nanopipe.stages.a", "nanopipe.x"],
                   "b": ["nanopipe.lib.y", "nanopipe.stages.b", "nanopipe.x"],
                   "c": ["nanopipe.stages.c", "nanopipe.z"]}
    # not nanopipe.runner (TYPE_CHECKING), not numpy (outside the package), not the stage registry,
    # not the package inits that hold only a docstring and __version__


def test_editing_a_module_changes_exactly_the_stages_that_import_it(pkg):
    before = keys(pkg)
    (pkg / "nanopipe/x.py").write_text("LIMIT = 4\n")
    after = keys(pkg)
    assert {s for s in "abc" if before[s] != after[s]} == {"a", "b"}  # b through a lazy import
    assert after["b"]["nanopipe.x"] != before["b"]["nanopipe.x"]
    assert after["b"]["nanopipe.lib.y"] == before["b"]["nanopipe.lib.y"]
    (pkg / "nanopipe/z.py").write_text("import numpy\nimport torch\n")
    assert {s for s, d in keys(pkg).items() if d != after[s]} == {"c"}


def test_comments_docstrings_and_formatting_change_no_key(pkg):
    before = keys(pkg)
    write(pkg, {"nanopipe/lib/y.py": '''
        """A module docstring, new."""


        def helper( ):  # a comment
            """What it does."""
            from ..x import (
                LIMIT,
            )
            return (LIMIT)
        ''',
        "nanopipe/__init__.py": '"""Reworded."""\n__version__ = "2.0"  # a release bumps this\n',
        "nanopipe/stages/__init__.py": 'STAGES = {"a": (), "b": (), "c": (), "d": ("a",)}\n'})  # a new stage
    assert keys(pkg) == before
    (pkg / "nanopipe/x.py").write_text("LIMIT = 3\nNAME = 'a string that is not a docstring'\n")
    assert keys(pkg)["a"] != before["a"]


def test_a_new_import_edge_is_picked_up_without_touching_the_stage(pkg):
    before = keys(pkg)["c"]
    (pkg / "nanopipe/z.py").write_text("import numpy\n\ndef f():\n    from nanopipe.lib import y\n")
    after = keys(pkg)["c"]
    assert set(after) - set(before) == {"nanopipe.lib.y", "nanopipe.x"}
    # an import in the else branch of `if TYPE_CHECKING` runs; one under typing.TYPE_CHECKING does not
    (pkg / "nanopipe/z.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import nanopipe.x\n"
                                       "else:\n    import nanopipe.runner\n")
    assert set(keys(pkg)["c"]) == {"nanopipe.stages.c", "nanopipe.z", "nanopipe.runner"}


def test_package_init_counts_when_it_holds_code(pkg):
    write(pkg, {"nanopipe/lib/__init__.py": "from nanopipe.lib.y import helper\nREGISTRY = {}\n"})
    assert "nanopipe.lib" in keys(pkg)["b"] and "nanopipe.lib" not in keys(pkg)["a"]


# ----- the real stages -----

def test_real_closures_hold_what_the_stages_import():
    closure = {s: set(stage_code(s)["code"]["modules"]) for s in STAGES}
    # the modules the hand-written lists left out (the drift), found from the imports
    assert {"nanopipe.train.common", "nanopipe.train.base", "nanopipe.tokenizer"} <= closure["base_eval"]
    assert {"nanopipe.model", "nanopipe.tokenizer", "nanopipe.engine", "nanopipe.serve.app"} <= closure["serve"]
    assert {"nanopipe.tokenizer", "nanopipe.train.common", "nanopipe.eval.chat"} <= closure["chat_eval"]
    assert all("nanopipe.stages" not in c and "nanopipe.runner" not in c for s, c in closure.items() if s != "report")
    assert closure["setup"] == {"nanopipe.stages.setup"}
    # a stage gets its settings as data: the config module (presets, defaults) is no stage's code
    assert all("nanopipe.config" not in c for c in closure.values())


def test_real_edit_of_train_common_changes_exactly_the_training_and_eval_stages(edited_source):
    before = {s: runner.code_version(s) for s in STAGES}
    edited_source("nanopipe.train.common", lambda t: t + "\nEDITED_CONSTANT = 1\n")
    changed = {s for s in STAGES if runner.code_version(s) != before[s]}
    assert changed == {"base_train", "base_eval", "mid_train", "sft", "rl", "chat_eval"}
    edited_source("nanopipe.model", lambda t: t + "\n# a comment\n")
    assert {s: runner.code_version(s) for s in STAGES} == before


def test_version_is_read_from_the_source_and_a_bump_changes_the_key(edited_source):
    before = stage_code("sft")
    edited_source("nanopipe.stages.sft", lambda t: t.replace("VERSION = 1", "VERSION = 2"))
    after = stage_code("sft")
    assert after["code"]["version"] == 2 and after["code_version"].startswith("v2-")
    assert after["code"]["modules"] == before["code"]["modules"]
    edited_source("nanopipe.stages.sft", lambda t: t.replace("VERSION = 1", "VERSION = '1'"))
    with pytest.raises(ValueError, match="must declare VERSION"):
        runner.code_version("sft")
