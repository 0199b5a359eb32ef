"""Bad input and faults: each ends with one `error:` line naming the file or key, exit code 2, no
traceback, and every earlier output byte-identical afterwards.

Parameter faults go through `dvc repro` (DVC must not remove any output before the parameters are
refused); file faults run the stage that meets them. A full disk and a read-only directory are real
small tmpfs filesystems mounted over the output directory (this needs root, as CI has)."""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run

pytestmark = pytest.mark.slow

OUTPUTS = ("models", "reports", "dvclive", "cache", "data", "checkpoints")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for d in OUTPUTS if (root / d).exists()
            for f in sorted((root / d).rglob("*")) if f.is_file()}


@pytest.fixture
def project(built):
    """A copy of the project on which the whole pipeline ran once, committed (conftest)."""
    return built


def one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    return errors[0]


def set_params(root: Path, **dotted) -> None:
    p = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = p
        for part in parents:
            node = node[part]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


PARAM_FAULTS = {
    "unknown top-level key": (lambda r: (r / "params.yaml").write_text(
        (r / "params.yaml").read_text() + "bogus: 1\n"), ["bogus = 1: unknown key"]),
    "bad optimizer value": (lambda r: set_params(r, **{"teacher.optim.momentum": 2.0}),
                            ["teacher.optim.momentum = 2.0"]),
    "bad opset": (lambda r: set_params(r, **{"export.opset": 99}), ["export.opset = 99"]),
    "empty params.yaml": (lambda r: (r / "params.yaml").write_text(""), ["params.yaml"]),
    "infinite learning rate": (lambda r: set_params(r, **{"teacher.optim.lr": float("inf")}),
                               ["teacher.optim.lr = inf", "finite"]),
    "top-k of all classes": (lambda r: set_params(r, **{"cache.topk": 10}),
                             ["cache.topk = 10", "below the 10 classes"]),
}


@pytest.mark.parametrize("fault", sorted(PARAM_FAULTS))
def test_bad_params_stop_dvc_before_any_output_is_removed(project, fault):
    mutate, expected = PARAM_FAULTS[fault]
    before = snapshot(project)
    mutate(project)
    result = run(["dvc", "repro"], project, check=False)
    one_error_line(result, *expected)
    assert snapshot(project) == before


def test_an_experiment_with_an_unknown_key_is_refused(project):
    before = snapshot(project)
    result = run(["dvc", "exp", "run", "-S", "+bogus=1"], project, check=False)
    one_error_line(result, "bogus = 1: unknown key")
    assert run(["dvc", "exp", "list", "--name-only"], project).stdout.strip() == ""
    assert snapshot(project) == before


MANIFEST = "cache/teacher_logits/manifest.json"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FILE_FAULTS = {
    # fault: (damage, stage that meets it, text the error line holds)
    "truncated teacher, evaluate": (lambda r: truncate(r / "models/teacher.safetensors"), "evaluate",
                                    "cannot read models/teacher.safetensors"),
    "truncated teacher, distill": (lambda r: truncate(r / "models/teacher.safetensors"), "distill",
                                   "cannot read models/teacher.safetensors"),
    "manifest with bad bytes": (lambda r: (r / MANIFEST).write_bytes(b"\xff\xfe{"), "distill",
                                "manifest.json: damaged"),
    "manifest with bad JSON": (lambda r: (r / MANIFEST).write_text('{"format": '), "distill",
                               "manifest.json: damaged"),
    "manifest missing a key": (lambda r: (r / MANIFEST).write_text('{"format": "bayeskd.logit_cache/2"}'),
                               "distill", "manifest.json: damaged (no entry"),
    "diverging loss": (lambda r: set_params(r, **{"teacher.optim.lr": 1e30}), "train_teacher",
                       "the loss became non-finite"),
}


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_damaged_inputs_end_the_stage_with_one_line(project, fault):
    damage, stage, expected = FILE_FAULTS[fault]
    damage(project)
    before = snapshot(project)
    result = run(["python", f"stages/{stage}.py"], project, check=False)
    assert result.returncode == 2
    one_error_line(result, expected)
    assert snapshot(project) == before


def test_an_unreadable_checkpoint_is_moved_aside_and_training_starts_afresh(project):
    reference = (project / "models/teacher.safetensors").read_bytes()
    (project / "checkpoints").mkdir(exist_ok=True)
    (project / "checkpoints/teacher.pt").write_bytes(b"not a checkpoint")
    result = run(["python", "stages/train_teacher.py"], project)
    assert "warning: checkpoint checkpoints/teacher.pt is unreadable" in result.stdout
    assert "weights_only=False" not in result.stdout + result.stderr
    assert (project / "checkpoints/teacher.pt.unreadable").read_bytes() == b"not a checkpoint"
    assert (project / "models/teacher.safetensors").read_bytes() == reference  # the same training
    epochs = [line for line in result.stdout.splitlines() if " epoch " in line]
    assert len(epochs) == 3 and "\r" not in result.stdout + result.stderr  # one line per epoch in logs


@contextlib.contextmanager
def small_filesystem(directory: Path, free_bytes: int | None = None, read_only: bool = False):
    """`directory` on a fresh tmpfs holding its old files, then filled up to `free_bytes` left, or
    remounted read-only. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    keep = directory.with_name(directory.name + ".orig")
    shutil.copytree(directory, keep)
    run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(directory)], directory.parent)
    try:
        shutil.copytree(keep, directory, dirs_exist_ok=True)
        if free_bytes is not None:  # a filler in a folder of its own, which no stage clears
            (directory / ".filler").mkdir()
            with open(directory / ".filler/zeros", "wb", buffering=0) as f:
                f.write(bytes(shutil.disk_usage(directory).free - free_bytes))
        if read_only:
            run(["mount", "-o", "remount,ro", str(directory)], directory.parent)
        yield
    finally:
        run(["umount", str(directory)], directory.parent, check=False)
        shutil.rmtree(keep)


OUTPUT_FAULTS = {
    # fault: (directory on the small filesystem, stage, free bytes or None for read-only, error text)
    "full disk, evaluate": ("reports", "evaluate", 4096, "No space left on device"),
    "read-only reports, evaluate": ("reports", "evaluate", None, "Read-only file system"),
    "read-only models, export": ("models", "export_onnx", None, "Read-only file system"),
    "full disk, teacher": ("models", "train_teacher", 4096, "No space left on device"),
}


@pytest.mark.parametrize("fault", sorted(OUTPUT_FAULTS))
def test_unwritable_outputs_end_the_stage_with_one_line_and_keep_the_old_ones(project, fault):
    directory, stage, free, reason = OUTPUT_FAULTS[fault]
    before = snapshot(project)
    with small_filesystem(project / directory, free_bytes=free, read_only=free is None):
        result = run(["python", f"stages/{stage}.py"], project, check=False)
        after = {k: v for k, v in snapshot(project).items() if "/.filler/" not in k}
    assert result.returncode == 2
    line = one_error_line(result, reason)
    assert line.startswith(f"error: cannot write {directory}/")
    if stage != "train_teacher":  # a training run's curves and checkpoint are its progress, kept to resume
        assert after == before
    else:
        assert after["models/teacher.safetensors"] == before["models/teacher.safetensors"]


def test_a_full_disk_in_the_cache_build_says_so_and_the_build_resumes(project):
    """The cache is too large to keep an old copy beside a new one: a failed build keeps its
    complete shards and resumes from them once there is room."""
    set_params(project, **{"cache.dtype": "float32", "cache.shard_size": 300})  # a new build, 4 shards
    with small_filesystem(project / "cache/teacher_logits", free_bytes=4096):  # and the old build's room
        result = run(["python", "stages/cache_logits.py"], project, check=False)
        assert result.returncode == 2
        one_error_line(result, "error: cannot write cache/teacher_logits/", "No space left on device")
        shutil.rmtree(project / "cache/teacher_logits/.filler")  # room again
        resumed = run(["python", "stages/cache_logits.py"], project).stdout
    assert "cache shard 1/4: already built" in resumed


def test_a_bad_override_of_the_pipeline_flow_is_one_line(project):
    result = run(["python", "-m", "flows.pipeline", "teacher.loss=hinge"], project, check=False)
    assert result.returncode == 2
    one_error_line(result, "teacher.loss = 'hinge': not allowed")
    assert len((result.stdout + result.stderr).splitlines()) <= 3


def test_a_damaged_prepared_split_is_named(project):
    truncate(project / "data/prepared/train.npz")
    result = run(["python", "stages/train_teacher.py"], project, check=False)
    assert result.returncode == 2
    one_error_line(result, "data/prepared/train.npz: damaged")

