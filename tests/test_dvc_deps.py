"""dvc.yaml: every stage depends on every file of project code it runs, so DVC never calls stale
results up to date."""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The project file of module `name` (bayeskd.* or the stages' `common`), or None."""
    if name == "common":
        return ROOT / "stages/common.py"
    if name.split(".")[0] != "bayeskd":
        return None
    base = ROOT / "src" / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def declaration_calls(f: Path, name: str) -> list[ast.Call]:
    """The calls of `bayeskd.declare.<name>` (collect or scan) in file `f`."""
    return [node for node in ast.walk(ast.parse(f.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == name]


def imported_files(script: Path) -> set[Path]:
    """`script` and every project file it imports, at any depth, including imports inside functions,
    the packages' __init__ files, and every module of a package that imports all of its modules
    (`declare.collect`)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if declaration_calls(f, "collect"):
            todo += sorted(f.parent.glob("*.py"))
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a module's packages run their __init__ first
                    found = module_file(".".join(parts[:i]))
                    if found:
                        todo.append(found)
    return seen


def run_files(stage: dict) -> set[Path]:
    words = stage["cmd"].split("#")[0].split()
    scripts = [ROOT / w for w in words if w.endswith(".py")]
    if "-m" in words:
        scripts.append(module_file(words[words.index("-m") + 1]))
    return set().union(*(imported_files(s) for s in scripts))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_all_code_it_runs(name):
    deps = [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in STAGES[name]["deps"]]
    code = run_files(STAGES[name])
    assert len(code) > 3  # the walk found the library, not just the script
    missing = sorted(str(f.relative_to(ROOT)) for f in code
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"stage {name} runs code it does not depend on: {missing}"


def test_the_schema_stage_depends_on_the_declarations_it_reads_from_source():
    """bayeskd.config reads the methods' and nets' declarations with `declare.scan` (without importing
    them): the stage that writes the schema must depend on those packages."""
    config = ROOT / "src/bayeskd/config.py"
    scanned = {ROOT / "src/bayeskd" / c.args[0].right.value for c in declaration_calls(config, "scan")}
    assert {p.name for p in scanned} == {"methods", "zoo"}
    deps = {ROOT / (d if isinstance(d, str) else next(iter(d))) for d in STAGES["check_params"]["deps"]}
    assert scanned <= deps
