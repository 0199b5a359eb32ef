"""Where a stage process's time goes: imports against the stage's own work, per stage, in a project
where `dvc repro` has run (the stages rewrite the same outputs; MLflow logs into a temporary store).

The end-to-end tests run the stages many times on tiny data, so imports are most of the suite's
time. Each stage runs once as `python -X importtime stages/<stage>.py`; its import time is summed
per top-level package, and a fresh `python -c "import torch"` is the reference. torch._dynamo is the
one to watch: 1 to 2.5 s, pulled in by torchvision, torch.onnx's exporter and the construction of any
torch optimizer. Run from the repository root after `make run` (or in a copy with tiny params):

    python benchmarks/stage_startup.py [PROJECT]

The last line is the share of the stages' wall time spent importing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)")
SHOWN = ("torch", "great_expectations", "scipy", "mlflow", "sqlalchemy", "onnx", "onnxscript", "dvclive")


def run(args: list[str], cwd: Path, env: dict) -> tuple[float, collections.Counter, float]:
    """Wall seconds of `python -X importtime ARGS`, and its import seconds per top-level package
    (self times), with torch._dynamo's cumulative time (what it imports included) apart."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed in {cwd}:\n{result.stderr[-2000:]}")
    per_package: collections.Counter = collections.Counter()
    dynamo = 0.0
    for m in LINE.finditer(result.stderr):
        per_package[m.group(3).split(".")[0]] += int(m.group(1)) / 1e6
        if m.group(3) == "torch._dynamo":
            dynamo = int(m.group(2)) / 1e6
    return wall, per_package, dynamo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", nargs="?", default=".", type=Path,
                        help="a project where `dvc repro` has run (default: here)")
    args = parser.parse_args()
    project = args.project.resolve()
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("DVC_STAGE", None)
        wall, imports, _ = run(["-c", "import torch"], project, env)
        reference = 'python -c "import torch"'
        print(f"{reference:<22} {wall:6.2f} s wall, {sum(imports.values()):5.2f} s importing")
        total_wall = total_imports = 0.0
        for name in stages:
            wall, imports, dynamo = run([f"stages/{name}.py"], project, env)
            total_wall, total_imports = total_wall + wall, total_imports + sum(imports.values())
            top = ", ".join(f"{p} {imports[p]:.1f}" for p in SHOWN if imports[p] >= 0.05)
            top += f"; torch._dynamo with its imports {dynamo:.1f}" if dynamo else ""
            print(f"{name:<22} {wall:6.2f} s wall, {sum(imports.values()):5.2f} s importing ({top})")
    print(f"share of the stages' wall time spent importing: {total_imports / total_wall:.2f}")


if __name__ == "__main__":
    main()
