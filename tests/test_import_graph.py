"""The import graph: no cycles, and every import inside krea2_lite points down the layer table.

Every import counts: module-level, inside functions (lazy imports hide a cycle or an upward arrow,
they do not remove it) and under TYPE_CHECKING. Nothing is exempt. The layer table below is the
one in docs/ARCHITECTURE.md (a test compares them), so the doc cannot drift from the code.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

import krea2_lite

PACKAGE = Path(krea2_lite.__file__).resolve().parent
ROOT = PACKAGE.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# Floors, bottom → top. A module may import modules of its own floor or below, never above. A module
# belongs to the entry that names it or its closest enclosing package. An entry for a module that does
# not exist (yet) is allowed: it names where that module goes when it lands.
LAYERS = [
    ("errors", ("krea2_lite.errors", "krea2_lite.version")),
    ("files", ("krea2_lite.files",)),
    ("config", ("krea2_lite.config", "krea2_lite.variants", "krea2_lite.checks",
                "krea2_lite.demo")),
    ("kernels", ("krea2_lite.kernels",)),
    ("model", ("krea2_lite.model", "krea2_lite.sampling")),
    ("lora", ("krea2_lite.lora",)),
    ("quantize", ("krea2_lite.quantize",)),
    ("offload", ("krea2_lite.offload",)),
    ("loading", ("krea2_lite.loading",)),
    ("generation", ("krea2_lite.cache", "krea2_lite.finite_checks", "krea2_lite.images_in", "krea2_lite.inpaint",
                    "krea2_lite.metadata", "krea2_lite.pipeline", "krea2_lite.pipeline_memory")),
    ("training", ("krea2_lite.train",)),
    ("cli", ("krea2_lite.cli", "krea2_lite.__main__", "krea2_lite.quantize.__main__", "krea2_lite.demo.train",
             "krea2_lite.train.__main__", "krea2_lite.batch", "krea2_lite.serve")),
    ("package", ("krea2_lite",)),
]


def module_names(root: Path, top: str) -> dict[str, Path]:
    """{dotted name: file} of every Python file under `root` (a folder named `top`)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = [top, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def all_modules() -> dict[str, Path]:
    names = module_names(PACKAGE, "krea2_lite")
    for folder in ("benchmarks", "tests"):
        if (ROOT / folder).is_dir():
            names.update(module_names(ROOT / folder, folder))
    return names


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(name: str, importer: str, known: dict[str, Path], by_basename: dict[str, list[str]]) -> str | None:
    """The known module `name` means when `importer` imports it. Scripts in benchmarks/ and tests/
    import each other by bare name (their folders are put on sys.path): those resolve by file name,
    the importer's own folder first."""
    if name in known:
        return name
    head = name.split(".")[0]
    if importer.startswith("krea2_lite") or name != head:
        return None
    candidates = by_basename.get(head, [])
    own = importer.split(".")[0]
    candidates = sorted(candidates, key=lambda c: (not c.startswith(own + "."), c))
    return candidates[0] if candidates else None


def imports_of(module: str, path: Path, known: dict[str, Path], by_basename: dict[str, list[str]]) -> set[str]:
    """Known modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _target(module, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            resolved = _resolve(target, module, known, by_basename)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


@functools.cache
def _whole_graph() -> dict[str, frozenset[str]]:
    return {m: frozenset(ts) for m, ts in graph(all_modules()).items()}


def graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    if known is None:  # the whole tree, parsed once per test run
        return {m: set(ts) for m, ts in _whole_graph().items()}
    by_basename: dict[str, list[str]] = {}
    for name in known:
        if not name.startswith("krea2_lite"):
            by_basename.setdefault(name.rpartition(".")[2], []).append(name)
    return {name: imports_of(name, path, known, by_basename) for name, path in known.items()}


def package_graph() -> dict[str, set[str]]:
    edges = graph()
    return {m: {t for t in ts if t.startswith("krea2_lite")} for m, ts in edges.items() if m.startswith("krea2_lite")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def floor_of(module: str, layers=LAYERS) -> int | None:
    """Index of the floor whose entry names `module` or its closest enclosing package."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def upward_imports(edges: dict[str, set[str]], layers=LAYERS) -> list[str]:
    arrows = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if floor_of(target, layers) > floor_of(module, layers):
                arrows.append(f"{module} ({layers[floor_of(module, layers)][0]}) → {target} "
                              f"({layers[floor_of(target, layers)][0]})")
    return arrows


# ---- the package ------------------------------------------------------------------------------

def test_no_import_cycles_in_the_package():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_every_module_of_the_package_has_a_floor():
    unplaced = sorted(m for m in module_names(PACKAGE, "krea2_lite") if floor_of(m) is None)
    assert not unplaced, f"modules missing from the layer table: {unplaced}"


def test_imports_point_down_the_layers():
    arrows = upward_imports(package_graph())
    assert not arrows, "imports pointing up the layer table:\n  " + "\n  ".join(arrows)


def test_files_imports_nothing_of_the_package_but_errors():
    edges = package_graph()
    outside = {f"{m} → {t}" for m, ts in edges.items() if m.startswith("krea2_lite.files")
               for t in ts if not t.startswith(("krea2_lite.files", "krea2_lite.errors"))}
    assert not outside, sorted(outside)


def test_quantize_and_model_do_not_reach_loading_or_offload():
    """The former circles (model → loading → quantize → model; quantize → loading) stay closed."""
    low = (floor_of("krea2_lite.model"), floor_of("krea2_lite.quantize"))
    for module, targets in package_graph().items():
        if floor_of(module) in low:
            assert not {t for t in targets if t.startswith(("krea2_lite.loading", "krea2_lite.offload"))}, module


def test_the_checker_sees_function_local_imports_and_upward_arrows():
    edges = package_graph()
    # load_text_encoder imports quantize.text_encoder inside functions only.
    assert "krea2_lite.quantize.text_encoder" in edges["krea2_lite.loading.text_encoder"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    layers = [("low", ("a",)), ("high", ("b",))]
    assert upward_imports({"a": {"b"}, "b": set()}, layers) == ["a (low) → b (high)"]
    assert upward_imports({"b": {"a"}, "a": set()}, layers) == []
    assert floor_of("krea2_lite.quantize.__main__") == floor_of("krea2_lite.cli")
    assert floor_of("krea2_lite.quantize.qlinear") == floor_of("krea2_lite.quantize")


def test_public_import_paths():
    import krea2_lite.model.text_encoder as text_model
    from krea2_lite import load_transformer
    from krea2_lite.loading import PipelineSpec, load_text_encoder, resolve_pipeline  # noqa: F401

    assert load_transformer.__module__ == "krea2_lite.loading.transformer"
    assert load_text_encoder.__module__ == "krea2_lite.loading.text_encoder"
    assert not hasattr(text_model, "load_text_encoder")  # the model file holds no loader, nor a shim of one


# ---- the doc's table is the test's table ------------------------------------------------------

def doc_layers() -> list[tuple[str, tuple[str, ...]]]:
    """The layer table of docs/ARCHITECTURE.md: rows `| N | floor | `module`, ... |`, bottom first."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 3 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], tuple(re.findall(r"`(krea2_lite[\w.]*)`", cells[2]))))
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "the doc's floors are numbered 1, 2, ... bottom up"
    return [(name, modules) for _, name, modules in rows]


def test_the_doc_table_is_the_test_table():
    assert doc_layers() == LAYERS


# ---- benchmarks/ and tests/ ------------------------------------------------------------------

def benchmark_and_test_problems(edges: dict[str, set[str]]) -> set[str]:
    problems = set()
    for module, targets in edges.items():
        for target in targets:
            if module.startswith("krea2_lite") and not target.startswith("krea2_lite"):
                problems.add(f"{module} → {target}")  # the package never imports its tests or benchmarks
            if module.startswith("benchmarks") and target.startswith("tests"):
                problems.add(f"{module} → {target}")
            if module < target and module in edges.get(target, ()):
                problems.add(f"{module} ↔ {target}")
    two_way = {tuple(p.split(" ↔ ")) for p in problems if "↔" in p}
    acyclic = {m: {t for t in ts if (m, t) not in two_way and (t, m) not in two_way} for m, ts in edges.items()}
    cycle = find_cycle(acyclic)
    if cycle:
        problems.add("cycle: " + " → ".join(cycle))
    return problems


def test_benchmarks_and_tests_import_one_way_without_cycles():
    problems = benchmark_and_test_problems(graph())
    assert not problems, "benchmarks/tests import problems:\n  " + "\n  ".join(sorted(problems))


def test_the_benchmark_checker_finds_each_kind_of_problem():
    edges = {"benchmarks.a": {"tests.f", "benchmarks.b"}, "benchmarks.b": {"benchmarks.a"}, "tests.f": set(),
             "tests.x": {"tests.y"}, "tests.y": {"tests.z"}, "tests.z": {"tests.x"}}
    assert benchmark_and_test_problems(edges) == {"benchmarks.a → tests.f", "benchmarks.a ↔ benchmarks.b",
                                                  "cycle: tests.x → tests.y → tests.z → tests.x"}


# ---- what the doc claims about reading weights ------------------------------------------------

def _calls(path: Path) -> set[str]:
    """Names of the functions and methods `path` calls, and `assign=` when a call passes it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
            if any(k.arg == "assign" for k in node.keywords):
                found.add("assign=")
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", "") == "torch":
                found.add("torch.load")
    return found


# The training script of the shipped miniature trains and checkpoints its own models.
FILL_EXEMPT = {"krea2_lite.demo.train": "trains the demo model: loads its own training checkpoints"}


def test_one_fill_routine():
    """Only loading/ fills a model's weights (load_state_dict, assign=, whole-file loads); only files/
    opens safetensors files and reads tensors from them, for loading/ — and for lora/formats.py, which
    reads LoRA files into new branch tensors, never into a model's weights. Nothing unpickles."""
    fill, read = {"load_state_dict", "assign=", "load_file", "load_model"}, {"safe_open", "safe_load"}
    tensors = {"open_safetensors", "read_tensor", "get_tensor", "get_slice"}
    wrong = []
    for name, path in sorted(module_names(PACKAGE, "krea2_lite").items()):
        calls = _calls(path)
        if "torch.load" in calls:
            wrong.append(f"{name}: torch.load (unpickles)")
        if name in FILL_EXEMPT:
            continue
        if calls & fill and not name.startswith("krea2_lite.loading."):
            wrong.append(f"{name}: {sorted(calls & fill)}")
        if calls & read and not name.startswith("krea2_lite.files."):
            wrong.append(f"{name}: {sorted(calls & read)}")
        if calls & tensors and not name.startswith(("krea2_lite.files.", "krea2_lite.loading.",
                                                     "krea2_lite.lora.formats")):
            wrong.append(f"{name}: {sorted(calls & tensors)}")
    assert not wrong, "weights read or filled outside files/ and loading/: " + "; ".join(wrong)


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
