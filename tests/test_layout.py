"""The house rules of the package, checked on its source (AST only: nothing under tldr_rlhf/ is run
except the stage table, so the whole file takes well under a second):

- a module under tldr_rlhf/ has at most 500 lines, a function (or method) at most 100;
- no import cycle between the package's modules, counting imports inside functions (an import under
  ``if TYPE_CHECKING:`` is not run and does not count);
- a module outside tldr_rlhf/train/ never imports tldr_rlhf.train (the library knows nothing of the
  training loops);
- no literal outside the table files (stages.py, presets.py, config/) names two or more stages: a tuple,
  list, set or dict-key literal with two stage names in it, or a string made of stage names only, is a side
  table that a new stage would have to find (``stages.STAGES`` holds the facts; test the row's family);
- every trainable stage row carries the facts that the model card, the report and the memory plan read;
- no module imports another module's private name (``from X import _name``, or ``X._name`` of a module
  bound by an import): what other modules use is public, named and documented where its concern lives.

``python tests/test_layout.py`` prints the acceptance figures (and each offence).
"""

from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tldr_rlhf"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
TABLE_FILES = ("tldr_rlhf/stages.py", "tldr_rlhf/presets.py", "tldr_rlhf/config/")
# Facts of a trainable stage's row that cards.py, report.py and plan.py read
ROW_FACTS = ("family", "title", "card_metrics", "card_settings", "curves", "plan_kind")
FAMILIES = ("supervised", "preference", "rl", "evaluation")
PLAN_KINDS = ("sequences", "pairs", "preference", "actor-critic", "group")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, tuple[Path, ast.Module, str]]:
    """Every module of the package: dotted name -> (path, parsed tree, source)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        out[_module_name(path)] = (path, ast.parse(source, filename=str(path)), source)
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def long_modules() -> list[str]:
    """'path: N lines' for each module over MAX_MODULE_LINES."""
    return [f"{_rel(p)}: {len(src.splitlines())} lines" for p, _, src in modules().values() if len(src.splitlines()) > MAX_MODULE_LINES]


def long_functions() -> list[str]:
    """'path:line name: N lines' for each function (any depth) over MAX_FUNCTION_LINES (def line to last line)."""
    out = []
    for path, tree, _ in modules().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{_rel(path)}:{node.lineno} {node.name}: {n} lines")
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    skip.add(id(inner))
    return skip


def _resolve_from(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}, at any depth in the module."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, tree, _) in mods.items():
        edges: dict[str, int] = {}
        skip = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, is_package, node)
                # "from pkg import sub" imports the submodule pkg.sub; "from mod import name" imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # "import tldr_rlhf.a.b" of a module: keep the module
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("tldr_rlhf"):
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int] | set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` (node -> the nodes it imports) with more than one
    node, each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_cycles() -> list[list[str]]:
    """The import cycles between the package's modules (function-level imports included)."""
    return strongly_connected(import_graph())


def library_train_imports() -> list[str]:
    """'module:line -> tldr_rlhf.train...' for each import of train/ from a module outside it."""
    out = []
    for name, edges in import_graph().items():
        if name == "tldr_rlhf.train" or name.startswith("tldr_rlhf.train."):
            continue
        for target, line in edges.items():
            if target == "tldr_rlhf.train" or target.startswith("tldr_rlhf.train."):
                out.append(f"{_rel(modules()[name][0])}:{line} -> {target}")
    return sorted(out)


def stage_names() -> set[str]:
    """The command names of ``stages.STAGES``, read from its source."""
    _, tree, _ = modules()["tldr_rlhf.stages"]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Stage" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


def _docstring_ids(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
        # an attribute docstring: a string expression right after an assignment
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    out.add(id(stmt.value))
    return out


def stage_literals() -> list[str]:
    """'path:line literal' for each literal outside the table files that names two or more stages."""
    names = stage_names()
    out = []
    for path, tree, _ in modules().values():
        rel = _rel(path)
        if any(rel == t or (t.endswith("/") and rel.startswith(t)) for t in TABLE_FILES):
            continue
        docs = _docstring_ids(tree)
        for node in ast.walk(tree):
            items: list[ast.AST] = []
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = list(node.elts)
            elif isinstance(node, ast.Dict):
                items = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                words = [w for w in re.split(r"[\s,]+", node.value) if w]
                if len(words) >= 2 and all(w in names for w in words):
                    out.append(f"{rel}:{node.lineno} {node.value!r}")
                continue
            named = [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]
            if len(named) >= 2:
                out.append(f"{rel}:{node.lineno} {tuple(named)}")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> list[str]:
    """'path:line module._name' for each use of another package module's private name: ``from X import
    _name`` (X a package module, ``_name`` not a submodule) or ``X._name`` where X is bound to a package
    module by an import (``from . import X``, ``import tldr_rlhf.X as X``), at any depth."""
    mods = modules()
    out = []
    for name, (path, tree, _) in mods.items():
        is_package = path.name == "__init__.py"
        bound: dict[str, str] = {}  # local name -> the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, is_package, node)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        bound[a.asname or a.name] = full
                    elif base in mods and base != name and _private(a.name):
                        out.append(f"{_rel(path)}:{node.lineno} {base}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        bound[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target = ast.unparse(node.value)
                module = bound.get(target, target if target in mods else None)
                if module and module != name:
                    out.append(f"{_rel(path)}:{node.lineno} {module}.{node.attr}")
    return sorted(set(out))


def missing_row_facts() -> list[str]:
    """'stage: field' for each fact (ROW_FACTS) a trainable stage's row leaves out or empty."""
    from tldr_rlhf.stages import STAGES

    out = []
    for stage in STAGES:
        if stage.train:
            out += [f"{stage.name}: {f}" for f in ROW_FACTS if not getattr(stage, f, None)]
            if getattr(stage, "family", None) and stage.family not in FAMILIES:
                out.append(f"{stage.name}: family {stage.family!r} is not one of {FAMILIES}")
            if getattr(stage, "plan_kind", None) and stage.plan_kind not in PLAN_KINDS:
                out.append(f"{stage.name}: plan_kind {stage.plan_kind!r} is not one of {PLAN_KINDS}")
        elif getattr(stage, "family", "") not in ("", *FAMILIES):
            out.append(f"{stage.name}: family {stage.family!r} is not one of {FAMILIES}")
    return out


# --- the tests ---------------------------------------------------------------------------------------


def test_modules_at_most_500_lines():
    assert not long_modules(), long_modules()


def test_functions_at_most_100_lines():
    assert not long_functions(), long_functions()


def test_no_import_cycles():
    assert not import_cycles(), import_cycles()


def test_library_never_imports_train():
    assert not library_train_imports(), library_train_imports()


def test_no_stage_name_tables_outside_the_stage_table():
    assert not stage_literals(), stage_literals()


def test_trainable_stage_rows_carry_every_fact():
    assert not missing_row_facts(), missing_row_facts()


def test_no_private_names_imported_across_modules():
    assert not private_imports(), private_imports()


def test_checker_sees_a_cycle_and_reads_the_tree():
    """The checker itself: a two-module circle and a three-module one are found, a chain is not; the
    package's own graph has the edges it must (cli imports the stage table) and the stage names are read."""
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert "tldr_rlhf.stages" in import_graph()["tldr_rlhf.cli"]
    assert {"sft", "rm", "ppo"} <= stage_names()


def figures() -> dict[str, list]:
    """Every offence by rule (the acceptance figures are their counts)."""
    return {
        "modules over 500 lines": long_modules(),
        "functions over 100 lines": long_functions(),
        "import cycles": [" <-> ".join(c) for c in import_cycles()],
        "library -> train/ imports": library_train_imports(),
        "literals naming two stages": stage_literals(),
        "trainable rows missing a fact": missing_row_facts(),
        "private names imported across modules": private_imports(),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for rule, offences in figures().items():
        print(f"{rule}: {len(offences)}")
        for o in offences:
            print(f"    {o}")
