"""Structure rules of the package that a reader relies on: no import cycle between its modules, no function longer
than about 80 lines without a reason in its docstring, no planned data hidden on tensor attributes, one index
planner (only the compiled one, reached through gencnp_fast.plan.indices)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "src" / "gencnp_fast"
MAX_LINES = 80


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text())


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_graph():
    """Module-level imports (those run at import time) between the package's modules."""
    mods = {name: (path, tree) for name, path, tree in _modules()}
    graph = {name: set() for name in mods}
    for name, (path, tree) in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in tree.body:  # top level only: imports inside functions run lazily
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def test_no_import_cycle():
    graph = _import_graph()
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m.startswith(n + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(m) == 1 and not n.startswith(m + "."):
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_functions_are_short_or_say_why():
    long = []
    for name, _, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_LINES and "Long because" not in doc:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "functions over %d lines without 'Long because' in the docstring: %s" % (MAX_LINES, long)


def test_no_planned_data_on_tensor_attributes():
    for name, path, _ in _modules():
        assert "_gencnp_group_table" not in path.read_text(), name


def test_one_index_planner():
    """Only gencnp_fast.plan.indices calls the compiled planner; no other module compacts masks itself."""
    callers = [name for name, path, _ in _modules() if "plan_run_indices" in path.read_text()]
    assert callers == ["gencnp_fast.plan.indices"], callers
    for name, path, _ in _modules():
        text = path.read_text()
        assert "compact_masks" not in text and "remap_positions" not in text, name
