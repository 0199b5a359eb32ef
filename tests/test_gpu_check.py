"""benchmarks/gpu_check.py at tiny sizes on the CPU, so that its first run on a GPU host is spent
on running, not on debugging; and the wheels it needs there, derived from its imports."""

import ast
import importlib.metadata as metadata
import json
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT, run

# imported by torch itself when it exports to ONNX (torch.onnx.export(dynamo=True)), not by our code
RUNTIME_IMPORTS = {"onnxscript"}
# imported only where the check never goes: bayeskd.integrity opens DVC to find its cache when it
# names the command that restores a damaged file, and gives the general advice where DVC is missing
NOT_REACHED = {"dvc"}


@pytest.mark.slow
def test_every_part_of_the_gpu_check_passes_on_the_cpu(tmp_path):
    result = run(["python", "benchmarks/gpu_check.py", str(tmp_path), "--cpu-smoke"], ROOT, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert [name[:2] for name in parts] == ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "b ", "c ", "d ", "e "]
    assert all(p["passed"] for p in parts.values())
    a = {k: v for name, p in parts.items() if name.startswith("a") and name[1] < "7" for k, v in p.items()}
    assert a["cache_vs_online_max_abs_diff"] < 1e-2  # float16 storage of the same logits
    assert a["max_abs_diff"] < 1e-4 and a["bit_identical"]  # ONNX parity; a repeated seed on the CPU
    assert a["compiled_graphs"] == 0  # the smoke test does not compile
    methods = next(p for name, p in parts.items() if name.startswith("a7"))
    assert {k for k in methods if k not in ("passed", "seconds")} >= {"crd", "reviewkd", "hsakd"}
    assert all(methods[k] == 0.0 for k in methods if k not in ("passed", "seconds"))  # bit for bit on the CPU
    b = parts["b throughput: this loop against the common loop, fp32 and bf16"]
    assert b["ours_over_fp32"] > 0 and b["resnet8_batch16"]["ours_images_per_s"] > 0
    assert b["resnet8_batch16"]["ours_host_syncs_per_step"] is None  # counted on a GPU only
    e = next(p for name, p in parts.items() if name.startswith("e "))
    assert e["views"] == 4 * 162 and e["views_per_s"] > 0
    assert result.stdout.strip().splitlines()[-1].startswith("this loop / common fp32 loop: ")
    assert (tmp_path / "gpu_check.log").read_text().count("== a1") == 2


def project_file(module: str) -> Path | None:
    """The file of a module of this project that gpu_check can import: bayeskd.*, or a sibling
    benchmark script."""
    parts = module.split(".")
    if parts[0] == "bayeskd":
        base = ROOT / "src" / Path(*parts)
        return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)
    f = ROOT / "benchmarks" / f"{parts[0]}.py"
    return f if len(parts) == 1 and f.exists() else None


def third_party_imports(script: Path) -> set[str]:
    """Top-level names of the modules outside this project and the standard library that `script`
    imports, following this project's modules, imports inside functions included."""
    seen, found, todo = set(), set(), [script]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                files = [project_file(".".join(name.split(".")[:i])) for i in range(1, name.count(".") + 2)]
                todo += [f for f in files if f]
                top = name.split(".")[0]
                if (top != "bayeskd" and not any(files) and top not in sys.stdlib_module_names
                        and top not in NOT_REACHED):
                    found.add(top)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_needed(modules: set[str], host: set[str]) -> set[str]:
    """The distributions of `modules` that the host lacks, with all their requirements (the host's
    copies of those are of unknown versions)."""
    owners = metadata.packages_distributions()
    todo = [canonical(d) for m in modules for d in owners[m] if canonical(d) not in host]
    needed: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in needed:
            continue
        needed.add(dist)
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return needed


def listed(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_wheels_to_carry_are_what_the_check_imports_beyond_the_host():
    host = {canonical(n) for n in listed(ROOT / "benchmarks/gpu_host_packages.txt")}
    modules = third_party_imports(ROOT / "benchmarks/gpu_check.py") | RUNTIME_IMPORTS
    assert {"torch", "numpy", "onnxruntime", "pydantic", "tqdm"} <= modules  # the walk found the library
    pinned = dict(line.split("==") for line in listed(ROOT / "benchmarks/gpu_wheels.txt"))
    assert set(pinned) == wheels_needed(modules, host)
    assert pinned == {name: metadata.version(name) for name in pinned}  # the versions tested here
