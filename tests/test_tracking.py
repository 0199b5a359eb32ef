import os
import socket

import mlflow
import pytest
import torch
import yaml

from bayeskd import export, nets, tracking
from conftest import run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository on branch main as the working directory, its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "teacher": {"loss": "mse"}}))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], tmp_path)
    yield tmp_path
    mlflow.end_run()


def student_onnx(path):
    model = nets.build("mlp_student", 3, (4,)).eval()
    path.write_bytes(export.to_onnx(model, torch.randn(2, 4), opset=18))
    return torch.randn(2, 4).numpy()


def test_sqlite_store_run_metrics_artifacts_and_registry(repo, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "reports").mkdir()
    (repo / "reports/metrics.json").write_text('{"student": {"accuracy": 0.5}}')
    example = student_onnx(repo / "student.onnx")
    with tracking.mlflow_run() as r:
        hook = r.epoch_hook("teacher")
        for epoch in range(3):
            hook(epoch, {"train/loss": 1.0 / (epoch + 1)})
        r.log_metrics({"student": {"accuracy": 0.5}})
        r.log_artifacts("reports")
        assert r.register_onnx("student.onnx", example) == "1"
        first = r.run_id
    with tracking.mlflow_run() as again:  # a later stage of the same execution: same run
        assert again.run_id == first

    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")  # an experiment: a new run, no alias move
    with tracking.mlflow_run() as exp:
        assert exp.run_id != first
        assert exp.register_onnx("student.onnx", example) == "2"

    client = mlflow.MlflowClient(tracking.tracking_uri())
    got = client.get_run(first)
    assert got.data.params["teacher.loss"] == "mse" and got.data.params["seed"] == "0"
    assert got.data.tags["git.commit"] == run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert got.data.tags["dvc.experiment"] == "" and "data.hash" in got.data.tags
    assert got.data.metrics["student.accuracy"] == 0.5
    assert [m.value for m in client.get_metric_history(first, "teacher/train/loss")] == pytest.approx(
        [1.0, 0.5, 1 / 3])
    assert [a.path for a in client.list_artifacts(first, "reports")] == ["reports/metrics.json"]
    assert client.get_run(exp.run_id).data.tags["dvc.experiment"] == "exp-one"
    assert client.get_registered_model(tracking.MODEL_NAME).aliases == {tracking.MAIN_ALIAS: 1}


def test_unreachable_server_warns_once_and_loses_nothing(repo, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with tracking.mlflow_run() as r:
        r.log_metrics({"a": 1.0})
        r.epoch_hook("teacher")(0, {"loss": 1.0})
    assert not r.active
    assert capsys.readouterr().err.count("warning: MLflow tracking off") == 1


def test_stage_with_unreachable_tracking_still_writes_its_outputs(project):
    env_uri = f"http://127.0.0.1:{free_port()}"
    os.environ["MLFLOW_TRACKING_URI"] = env_uri
    try:
        result = run(["python", "stages/prepare.py"], project)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert "MLflow tracking off" in result.stderr
    assert (project / "data/prepared/train.npz").exists() and (project / "reports/validation.json").exists()
    assert not (project / "mlflow.db").exists()
