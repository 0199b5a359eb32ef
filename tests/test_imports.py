"""The library's module graph: no import cycles (at any depth, imports inside functions included),
and the schema of params.yaml validates without torch."""

import ast
from pathlib import Path

from conftest import ROOT, run

PACKAGE = ROOT / "src" / "bayeskd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """bayeskd module -> the bayeskd modules it imports (a package import counts as its __init__)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for n in names:
                while n and n not in modules:
                    n = n.rpartition(".")[0]
                if n and n != name and not name.startswith(n + "."):  # a submodule's own package
                    found.add(n)
        edges[name] = found
    return edges


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert len(edges) > 20 and not cycles, cycles


def test_leaf_modules_import_nothing_of_the_package_but_io():
    edges = graph()
    for leaf in ("bayeskd.batch", "bayeskd.taps", "bayeskd.declare", "bayeskd.io"):
        assert edges[leaf] <= {"bayeskd"}, (leaf, edges[leaf])
    assert edges["bayeskd.datasets.base"] <= {"bayeskd", "bayeskd.io"}
    # the schema: the declarations and the datasets (which import no torch), nothing else
    assert edges["bayeskd.config"] <= {"bayeskd", "bayeskd.declare", "bayeskd.datasets"}


def test_importing_the_schema_imports_no_torch():
    run(["python", "-c", "import sys, bayeskd.config; assert 'torch' not in sys.modules"], ROOT)
