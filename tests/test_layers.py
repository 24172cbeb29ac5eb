"""Imports point down only (DESIGN.md, "Layers"), checked by parsing every module under nanopipe/.

The layers, top to bottom, and what may import what:

    nanopipe/cli.py, __main__.py   the entry points. The CLI may import flows/ (Prefect), but only
                                   inside a function, so that nanopipe works without Prefect.
    nanopipe/runner.py             the stage contract: loads stage modules by name (importlib).
    nanopipe/stages/<stage>.py     one module per stage.
    the library                    everything else under nanopipe/ (store, lineage, model, train,
                                   eval, serve, report, ...).

  - nothing under nanopipe/ imports prefect; only cli.py imports flows, lazily;
  - nanopipe.cli is imported only by __main__.py;
  - nanopipe.runner is imported at run time only by cli.py; a module may name its StageContext
    in annotations through `if TYPE_CHECKING:` (no import happens at run time);
  - no module imports a stage module (nanopipe.stages.<stage>): only the runner loads them;
  - the package nanopipe.stages itself (the DAG, STAGES) may be imported by any module, because
    its __init__ imports nothing, so reading the DAG never loads a stage; the code that reads it
    (pipeline order, which stages a run executes) is the library module nanopipe.dag.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"nanopipe.cli", "nanopipe.__main__"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    lazy: bool  # inside a function
    typing_only: bool  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        how = " (lazy)" if self.lazy else " (TYPE_CHECKING)" if self.typing_only else ""
        return f"{self.importer} imports {self.target}{how}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import in a module (top level, in functions, under TYPE_CHECKING), as absolute names;
    `from package import name` counts as importing package.name when that is a module."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, typing_only)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(importer, a.name, lazy, typing_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append(Import(importer, base, lazy, typing_only))
            found.extend(Import(importer, f"{base}.{a.name}", lazy, typing_only)
                         for a in node.names if is_module(f"{base}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


ALL = [imp for path in sorted((ROOT / "nanopipe").rglob("*.py")) for imp in imports_of(path)]


def under(target: str, top: str) -> bool:
    return target == top or target.startswith(top + ".")


def is_stage_module(name: str) -> bool:
    return name.startswith("nanopipe.stages.")


def test_the_parser_sees_the_known_edges():
    """Guards the rules below against passing because nothing was found."""
    edges = {(i.importer, i.target, i.lazy, i.typing_only) for i in ALL}
    assert ("nanopipe.cli", "flows.pipeline", True, False) in edges
    assert ("nanopipe.runner", "nanopipe.stages", False, False) in edges
    assert ("nanopipe.dag", "nanopipe.stages", False, False) in edges
    assert ("nanopipe.stages.report", "nanopipe.runner", False, True) in edges
    assert ("nanopipe.__main__", "nanopipe.cli", False, False) in edges
    assert ("nanopipe.tasks", "nanopipe.tasks.smoltalk", False, False) in edges


def test_nothing_imports_prefect_and_only_the_cli_imports_flows_lazily():
    bad = [i for i in ALL if under(i.target, "prefect")]
    bad += [i for i in ALL if under(i.target, "flows") and not (i.importer == "nanopipe.cli" and i.lazy)]
    assert not bad, "\n".join(map(str, bad))


def test_only_the_entry_points_import_the_cli():
    bad = [i for i in ALL if under(i.target, "nanopipe.cli") and i.importer != "nanopipe.__main__"]
    assert not bad, "\n".join(map(str, bad))


def test_only_the_cli_imports_the_runner_at_run_time():
    bad = [i for i in ALL if under(i.target, "nanopipe.runner") and not i.typing_only
           and i.importer not in ENTRY | {"nanopipe.runner"}]
    assert not bad, "\n".join(map(str, bad))


def test_no_module_imports_a_stage_module():
    bad = [i for i in ALL if is_stage_module(i.target)]
    assert not bad, "\n".join(map(str, bad))


def test_the_stage_registry_imports_nothing():
    """So reading the DAG (`from nanopipe.stages import STAGES`, as nanopipe.dag does) never loads a stage."""
    assert imports_of(ROOT / "nanopipe" / "stages" / "__init__.py") == []
