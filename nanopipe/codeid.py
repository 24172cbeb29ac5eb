"""A stage's code identity, derived from the code: the stage module and every nanopipe module it
imports, transitively, each hashed in a form that ignores comments, docstrings and formatting.

What counts (and why):
- Imports are found by parsing the source, not by running it. Module-level and lazy imports
  (inside functions) both count: lazy ones run when the stage does. Imports under
  ``if TYPE_CHECKING:`` do not: they never run. ``from pkg import name`` counts ``pkg``, and
  ``pkg.name`` too when that is a module. Relative imports and ``importlib.import_module("...")``
  with a literal name count as well.
- Importing a module runs its parent packages' ``__init__``, so those count, when they hold code
  (an ``__init__`` with only a docstring and ``__version__`` holds none).
- The stage registry ``nanopipe/stages/__init__.py`` never counts, even where a module imports it:
  it is the DAG, which the key already covers through the upstream identities, and adding a stage
  must not change every other stage's key.
- Modules outside the package (torch, numpy, ...) are not hashed: the manifest records versions.

The normal form of a module is ``ast.unparse`` of its tree without docstrings and without the
module-level version constants: ``__version__`` (the package version is in the manifest; a release
must not rebuild everything) and a stage's ``VERSION = <int>`` (the code version carries it on its
own). It is the same on every machine and in every process, for one Python minor version.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the directory holding the nanopipe package
PACKAGE = "nanopipe"
REGISTRY = f"{PACKAGE}.stages"
DIGEST_CHARS = 16


def read_source(path: Path) -> bytes:
    """The one place module source is read (tests substitute edited text here)."""
    return path.read_bytes()


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """The file of a module (``a/b.py`` or ``a/b/__init__.py``), or None (namespace package, not ours)."""
    rel = Path(*name.split("."))
    for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_digests(module: str, root: Path = ROOT) -> dict[str, str]:
    """Module name -> short digest of its normal form, for ``module`` and every package module it
    imports, transitively (the rules above). Sorted by name."""
    digests: dict[str, str] = {}
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen or mod == REGISTRY or mod.split(".")[0] != PACKAGE:
                continue
            seen.add(mod)
            path = module_path(mod, root)
            if path is None:
                continue
            digest, imports, _ = _parse(read_source(path))
            if digest:
                digests[mod] = digest
            is_package = path.name == "__init__.py"
            todo.extend(t for imp in imports for t in _targets(mod, is_package, *imp) if module_path(t, root))
    return dict(sorted(digests.items()))


def stage_code(stage: str) -> dict:
    """What a stage's key and manifest hold of its code: {"code_version": "v{VERSION}-{digest}",
    "code": {"version": VERSION, "modules": {module: digest}}}. Read from the source, once per process."""
    code_version, version, modules = _stage_identity(stage)
    return {"code_version": code_version, "code": {"version": version, "modules": dict(modules)}}


@lru_cache(maxsize=None)
def _stage_identity(stage: str) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    module = f"{REGISTRY}.{stage}"
    if module_path(module) is None:
        raise ValueError(f"stage {stage}: there is no module {module}")
    version = declared_version(module)
    if version is None:
        raise ValueError(f"stage {stage}: {module} must declare VERSION = <int> at module level")
    modules = module_digests(module)
    return f"v{version}-{combined_digest(modules)}", version, tuple(modules.items())


def declared_version(module: str, root: Path = ROOT) -> int | None:
    """The module's ``VERSION = <int>`` (read from the source: no import needed), or None."""
    path = module_path(module, root)
    return _parse(read_source(path))[2] if path else None


def combined_digest(digests: dict[str, str]) -> str:
    """One digest over the per-module digests."""
    text = "\n".join(f"{name} {d}" for name, d in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _targets(module: str, is_package: bool, level: int, target: str | None, names: tuple[str, ...]) -> list[str]:
    """Module names an import statement may load: the target and each imported name as a submodule."""
    if level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        target = ".".join(base + ([target] if target else []))
    return [target] + [f"{target}.{n}" for n in names if n != "*"]


@lru_cache(maxsize=None)
def _parse(source: bytes) -> tuple[str, tuple[tuple[int, str | None, tuple[str, ...]], ...], int | None]:
    """(digest of the normal form, or "" for a module without code; the imports that run; VERSION)."""
    tree = ast.parse(source)
    version = next((s.value.value for s in tree.body if _assigns(s, "VERSION") and type(s.value.value) is int), None)
    tree.body = [s for s in tree.body if not (_assigns(s, "__version__") or _assigns(s, "VERSION"))]
    found: list[tuple[int, str | None, tuple[str, ...]]] = []
    _visit(tree, found)
    if b"import_module" in source:
        found += [(0, n.args[0].value, ()) for n in ast.walk(tree) if _is_import_module(n)]
    text = ast.unparse(tree)
    digest = hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS] if text.strip() else ""
    return digest, tuple(found), version


def _assigns(stmt: ast.stmt, name: str) -> bool:
    """``name = <constant>``"""
    return isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
        and stmt.targets[0].id == name and isinstance(stmt.value, ast.Constant)


def _visit(node: ast.AST, found: list) -> None:
    """Drop the docstring of a module, class or function; collect the imports that run inside it."""
    body = getattr(node, "body", None)
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
            and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        _visit_statements(getattr(node, field, None) or (), found)


def _visit_statements(statements, found: list) -> None:
    """Imports are statements, so only statements are walked; ``if TYPE_CHECKING:`` bodies never run."""
    for stmt in statements:
        if isinstance(stmt, ast.Import):
            found.extend((0, alias.name, ()) for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            found.append((stmt.level, stmt.module, tuple(alias.name for alias in stmt.names)))
        elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            _visit_statements(stmt.orelse, found)
        elif isinstance(stmt, ast.AST):
            _visit(stmt, found)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module(node: ast.AST) -> bool:
    """importlib.import_module("literal.name")"""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func, arg = node.func, node.args[0]
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str)
