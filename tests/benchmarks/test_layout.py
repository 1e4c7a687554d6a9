"""benchmarks/ is a package of programs over krea2_lite: it never edits sys.path, never imports tests/,
has no import cycle, and names no module like one of the package's own (`kernels`, `quantize`, …);
outside tests/benchmarks/ no test imports it."""

import ast
from pathlib import Path

import krea2_lite

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
PACKAGE = Path(krea2_lite.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module an `import` / `from … import` anywhere in the file names (function-local ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def bench_files() -> list[Path]:
    return sorted(BENCH.rglob("*.py"))


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in bench_files() if "sys.path" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders


def test_no_module_named_like_a_package_module():
    package_names = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    clashes = [str(p.relative_to(ROOT)) for p in bench_files() if p.stem in package_names - {"__init__", "__main__"}]
    assert not clashes, clashes


def test_benchmarks_never_import_tests():
    test_modules = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests"}
    found = {str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.split(".")[0] in test_modules)
             for p in bench_files()}
    assert not {k: v for k, v in found.items() if v}


def test_only_the_benchmark_tests_import_benchmarks():
    found = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
             if "benchmarks" not in p.relative_to(ROOT / "tests").parts[:-1]
             and any(n.split(".")[0] == "benchmarks" for n in imported(p))]
    assert not found, found


def test_no_import_cycle_among_benchmarks():
    modules = {module_name(p): p for p in bench_files()}
    graph = {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, "import cycle: " + " → ".join(cycle)
    assert "benchmarks.gpu_proof.context" in graph["benchmarks.gpu_proof.quanto"]  # the checker sees local imports
