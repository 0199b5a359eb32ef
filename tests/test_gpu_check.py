"""benchmarks/gpu_check.py at tiny sizes on the CPU, so that its first run on a GPU host is spent
on running, not on debugging."""

import json

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


def test_every_part_of_the_gpu_check_passes_on_the_cpu(tmp_path):
    result = run(["python", "benchmarks/gpu_check.py", str(tmp_path), "--cpu-smoke"], ROOT, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert [name[:2] for name in parts] == ["a1", "a2", "a3", "a4", "a5", "a6", "b ", "c ", "d "]
    assert all(p["passed"] for p in parts.values())
    a = {k: v for name, p in parts.items() if name.startswith("a") for k, v in p.items()}
    assert a["cache_vs_online_max_abs_diff"] < 1e-2  # float16 storage of the same logits
    assert a["max_abs_diff"] < 1e-4 and a["bit_identical"]  # ONNX parity; a repeated seed on the CPU
    b = parts["b throughput: this loop against the common loop, fp32 and bf16"]
    assert b["ours_over_fp32"] > 0 and b["resnet8_batch16"]["ours_images_per_s"] > 0
    assert result.stdout.strip().splitlines()[-1].startswith("this loop / common fp32 loop: ")
    assert (tmp_path / "gpu_check.log").read_text().count("== a1") == 2
