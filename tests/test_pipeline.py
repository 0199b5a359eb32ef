"""The real pipeline through DVC on a copy of the project, with tiny parameters (`dvc repro` of the
default, then an MSE experiment beside it: tests/test_compare.py, which goes on from there)."""

import json
import signal
import subprocess
import time

import pytest
import torch
import yaml

from bayeskd import calibration, data, nets
from bayeskd.cache import IDENTITY, LogitCache
from bayeskd.io import sha256_file
from bayeskd.train import predict
from conftest import BIN, run, tiny_params

pytestmark = pytest.mark.slow


def test_temperature_scaled_teacher_reaches_the_cache_and_evaluate(built):
    """teacher.loss=ce_ts: CE, then T fitted on the validation split and folded into the weights. The
    saved teacher is the calibrated one (fitting T again on its validation logits gives 1), the
    logit cache holds its logits, and evaluate reports T and the transfer-set metrics."""
    project = built  # the default, built: the data are prepared
    run(["dvc", "exp", "run", "evaluate", "-S", "teacher.loss=ce_ts"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    temperature = metrics["teacher"]["calibration_temperature"]
    assert 0.2 < temperature < 5 and abs(temperature - 1) > 1e-3
    ds = data.load(project / "data/prepared", ("train", "val"))
    weights = project / "models/teacher.safetensors"
    teacher = nets.load_weights(nets.build("mlp_teacher", 10, ds.in_shape), weights)
    val = ds.splits["val"]
    logits = predict(teacher, torch.from_numpy(val.x)).numpy()
    assert calibration.fit_temperature(logits, val.y) == pytest.approx(1.0, abs=1e-3)
    assert metrics["teacher"]["val_nll"] == pytest.approx(calibration.nll(logits, val.y), rel=1e-6)
    train = torch.from_numpy(ds.splits["train"].x)
    cache = LogitCache(project / "cache/teacher_logits", num_samples=len(train), num_classes=10,
                       teacher_sha256=sha256_file(weights), augmentation=IDENTITY)
    cached = cache.logits(torch.arange(len(train)))
    torch.testing.assert_close(cached.float(), predict(teacher, train), atol=2e-2, rtol=1e-3)  # float16
    assert {"transfer_bcpd_mse", "transfer_bcpd_mse_at_t"} <= set(metrics["teacher"])


def test_killed_stage_resumes_bit_identical(project):
    params = tiny_params(**{"data.gaussian.n_samples": 30000, "data.gaussian.train_fraction": 0.8,
                            "teacher.optim.epochs": 8, "teacher.optim.milestones": [5]})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "stages/prepare.py"], project)
    weights, ckpt = project / "models/teacher.safetensors", project / "checkpoints/teacher.pt"
    curve = project / "dvclive/teacher/plots/metrics/train/loss.tsv"

    run(["python", "stages/train_teacher.py"], project)
    reference, reference_curve = weights.read_bytes(), curve.read_text()
    assert not ckpt.exists()  # removed once the weights are written
    weights.unlink()

    proc = subprocess.Popen([f"{BIN}/python", "stages/train_teacher.py"], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            done = len(torch.load(ckpt, weights_only=True)["history"])
            if done >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert 2 <= done < 8 and not weights.exists()

    out = run(["python", "stages/train_teacher.py"], project).stdout
    assert "resuming after epoch" in out
    assert weights.read_bytes() == reference
    assert curve.read_text() == reference_curve
    assert not ckpt.exists()


def test_views_through_the_stages_and_a_stale_cache_is_refused(project):
    params = tiny_params(**{"data.name": "digits", "data.augment.padding": 1, "teacher.net": "cnn_teacher",
                            "student.net": "cnn_student", "cache.views": 4})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "train_teacher", "cache_logits"):
        run(["python", f"stages/{stage}.py"], project)
    manifest = json.loads((project / "cache/teacher_logits/manifest.json").read_text())
    assert manifest["num_slots"] == 4 and manifest["augmentation"]["views"] == 18
    assert json.loads((project / "reports/cache_validation.json").read_text())["success"]
    run(["python", "stages/distill.py"], project)

    weights = nets.read_weights(project / "models/teacher.safetensors")  # another teacher: moved weights
    nets.save_tensors({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
                      project / "models/teacher.safetensors")
    stale = run(["python", "stages/distill.py"], project, check=False)
    assert stale.returncode == 2
    assert "teacher_sha256" in stale.stderr and "rerun the cache_logits" in stale.stderr
