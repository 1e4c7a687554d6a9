"""No import cycles among krea2_lite's modules, counting every import: module-level, inside functions
(lazy imports hide a cycle, they do not remove it) and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import krea2_lite

PACKAGE = Path(krea2_lite.__file__).resolve().parent
# Module-level `__getattr__` re-exports that keep an old import path working for users, and are not
# dependencies of the module's own code: (module, name it lends). Nothing else is exempt.
COMPAT_REEXPORTS = {("krea2_lite.model.text_encoder", "krea2_lite.loading.text_encoder")}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """krea2_lite modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exempt = set()
    for node in tree.body:  # the bodies of a module-level __getattr__, when it is a listed re-export
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            exempt |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _target(module, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target in known and target != module:
                if id(node) in exempt and (module, target) in COMPAT_REEXPORTS:
                    continue
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checker_sees_function_local_imports():
    edges = graph()
    # load_text_encoder imports quantize.text_encoder inside the function only.
    assert "krea2_lite.quantize.text_encoder" in edges["krea2_lite.loading.text_encoder"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_model_and_quantize_do_not_reach_the_loaders():
    """The two former circles: the low-level reader and the model file no longer import their loaders."""
    edges = graph()
    for low in ("krea2_lite.checkpoint", "krea2_lite.quantize.format", "krea2_lite.quantize.stream",
                "krea2_lite.model.text_encoder", "krea2_lite.quantize.text_encoder"):
        assert not {e for e in edges[low] if e.startswith(("krea2_lite.loading.transformer",
                                                            "krea2_lite.loading.text_encoder"))}, low


def test_old_import_paths_still_work():
    from krea2_lite import load_transformer
    from krea2_lite.loading import load_text_encoder as new
    from krea2_lite.model.text_encoder import load_text_encoder as old

    assert old is new and load_transformer.__module__ == "krea2_lite.loading.transformer"


def test_no_function_in_the_package_is_over_80_lines():
    """Long functions doing many jobs are where newcomers trip (issue 18): split them instead."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "functions over 80 lines: " + ", ".join(too_long)
