"""The real pipeline through DVC on a copy of the project, with tiny parameters."""

import json
import re
import signal
import subprocess
import time

import pytest
import torch
import yaml

from bayeskd import calibration, data, nets
from bayeskd.cache import IDENTITY, LogitCache
from bayeskd.io import sha256_file
from bayeskd.report import runs_in
from bayeskd.train import predict
from conftest import BIN, run, tiny_params

pytestmark = pytest.mark.slow


def test_repro_then_mse_experiment(built):
    """`dvc repro` of the default (the shared built project), then an MSE experiment beside it."""
    project = built
    metrics = json.loads((project / "reports/metrics.json").read_text())
    test_split = {"accuracy", "nll", "ece", "brier", "bcpd_mse", "val_accuracy", "val_nll"}
    transfer_set = {"train_accuracy", "transfer_bcpd_mse", "transfer_bcpd_mse_at_t", "plateau"}
    assert set(metrics["teacher"]) == test_split | transfer_set and set(metrics["student"]) == test_split
    assert metrics["distill_temperature"] == 4.0
    for role in ("teacher", "student"):
        assert 0.15 < metrics[role]["accuracy"] <= 1  # chance is 0.1
    assert 0 <= metrics["agreement"] <= 1 and 0.4 < metrics["bayes_accuracy"] < 0.8
    exported = json.loads((project / "reports/export.json").read_text())
    assert all(exported[r]["max_abs_diff"] <= 1e-4 for r in ("teacher", "student"))
    manifest = json.loads((project / "cache/teacher_logits/manifest.json").read_text())
    assert manifest["num_samples"] == 1200 and manifest["dtype"] == "float16"
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."

    # a fresh clone, no DVC remote, no cache: the commit's metrics, plots and curves are in git
    fresh = project.parent / "fresh"
    run(["git", "clone", "-q", str(project), str(fresh)], project.parent)
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], fresh).stdout)
    assert shown == json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    for command in (["dvc", "plots", "show", "-o", "out"], ["dvc", "plots", "diff", "HEAD", "-o", "out"]):
        result = run(command, fresh)
        assert "failed to load" not in result.stdout + result.stderr
        html = (fresh / "out/index.html").read_text()
        assert "dvclive_teacher_plots_metrics_val_acc_tsv" in html and '"acc": "0.' in html
    assert not (fresh / "models").exists()

    run(["dvc", "exp", "run", "-S", "teacher.loss=mse"], project)

    runs = runs_in(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    by_loss = {r.params["teacher"]["loss"]: r.metrics for r in runs}
    assert set(by_loss) == {"ce", "mse"}
    assert by_loss["ce"]["teacher"]["bcpd_mse"] != by_loss["mse"]["teacher"]["bcpd_mse"]
    assert by_loss["mse"] == json.loads((project / "reports/metrics.json").read_text())

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert "teacher.bcpd_mse" in diff["reports/metrics.json"]
    shown = run(["dvc", "plots", "diff", "HEAD", "-o", "plots_out"], project)
    assert "failed to load" not in shown.stdout + shown.stderr
    html = (project / "plots_out/index.html").read_text()
    plots = re.findall(r'<div id = "([^"]+)">', html)  # only the declared charts
    assert plots[:5] == ["validation_accuracy", "validation_nll", "training_accuracy", "reliability",
                         "student_confusion"]
    curves = {f"dvclive_{role}_plots_metrics_{curve}_tsv" for role in ("teacher", "student")
              for curve in ("lr", "train_acc", "train_loss", "val_acc", "val_nll")}
    assert curves <= set(plots[5:]) and all(p.startswith("dvclive_") for p in plots[5:])
    assert "<script src=" not in html and "vegaEmbed" in html  # scripts inlined: renders offline
    assert len(html) < 2_000_000

    bad = run(["dvc", "exp", "run", "-S", "teacher.loss=hinge"], project, check=False)
    assert bad.returncode != 0
    expected = "teacher.loss = 'hinge': not allowed; expected 'ce', 'mse', 'ls' or 'ce_ts'"
    assert expected in bad.stdout + bad.stderr


def test_temperature_scaled_teacher_reaches_the_cache_and_evaluate(project):
    """teacher.loss=ce_ts: CE, then T fitted on the validation split and folded into the weights. The
    saved teacher is the calibrated one (fitting T again on its validation logits gives 1), the
    logit cache holds its logits, and evaluate reports T and the transfer-set metrics."""
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
