import json
import socket

import mlflow
import pytest
import torch
import yaml

from bayeskd import export, nets, tracking
from conftest import run, wait_for_queue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit(repo, message="x", paths=("-A",)):
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", *paths], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository on branch main as the working directory, its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    # empty: the default store; and restored after the test, since mlflow.set_tracking_uri sets it
    # for subprocesses, which would send later tests' stages to this test's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "teacher": {"loss": "mse"}}))
    git_commit(tmp_path)
    yield tmp_path
    mlflow.end_run()


def student_onnx(path):
    model = nets.build("mlp_student", 3, (4,)).eval()
    path.write_bytes(export.to_onnx(model, torch.randn(2, 4), opset=18))
    return torch.randn(2, 4).numpy()


def write_curve(directory, name, values):
    path = directory / "plots" / "metrics" / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    leaf = name.rsplit("/", 1)[-1]
    path.write_text(f"step\t{leaf}\n" + "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(values)))


def test_one_run_with_curves_metrics_artifacts_and_a_tagged_model(repo, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "reports").mkdir()
    (repo / "reports/metrics.json").write_text('{"student": {"accuracy": 0.5}}')
    write_curve(repo / "dvclive/teacher", "train/loss", [1.0, 0.5, 1 / 3])
    write_curve(repo / "dvclive/teacher", "lr", [0.1, 0.1, 0.01])
    example = student_onnx(repo / "student.onnx")
    with tracking.mlflow_run() as r:
        assert r.register_onnx("student.onnx", example, {"student": {"accuracy": 0.5}}) == "1"
        r.log_metrics({"teacher": {"accuracy": 0.6}})
        r.log_curves(repo / "dvclive/teacher", "teacher")
        r.log_artifacts("reports")
        first = r.run_id

    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.KIND_TAG] == "custom_model_development"  # not the GenAI view
    got = client.get_run(first)
    assert got.info.status == "FINISHED"
    assert got.data.params["teacher.loss"] == "mse" and got.data.params["seed"] == "0"
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert got.data.tags["git.commit"] == commit
    assert got.data.tags["dvc.experiment"] == "" and "data.hash" in got.data.tags
    assert got.info.run_name == f"main@{commit[:7]}"  # experiments are named by DVC
    assert got.data.metrics == {"student.accuracy": 0.5, "teacher.accuracy": 0.6,
                                "teacher/train/loss": pytest.approx(1 / 3), "teacher/lr": 0.01}
    history = client.get_metric_history(first, "teacher/train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [a.path for a in client.list_artifacts(first, "reports")] == ["reports/metrics.json"]

    version = client.get_model_version(tracking.MODEL_NAME, "1")
    assert version.run_id == first
    assert {k: version.tags[k] for k in ("teacher.loss", "seed", "dvc.experiment", "git.commit")} == {
        "teacher.loss": "mse", "seed": "0", "dvc.experiment": "none", "git.commit": commit}
    assert version.description.startswith("mse teacher, seed 0: ") and commit[:7] in version.description
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert {(m.key, m.value) for m in model.metrics} == {("student.accuracy", 0.5)}  # its own only
    signature = mlflow.models.get_model_info(version.source).signature
    assert [s.name for s in signature.inputs.inputs] == ["input"]
    assert [(s.name, s.shape) for s in signature.outputs.inputs] == [("logits", (-1, 3))]
    assert client.get_registered_model(tracking.MODEL_NAME).aliases == {tracking.MAIN_ALIAS: 1}


def test_main_alias_follows_branch_main_and_its_tip_not_overrides(repo, monkeypatch):
    example = student_onnx(repo / "student.onnx")
    client = mlflow.MlflowClient(tracking.tracking_uri())

    def register():
        with tracking.mlflow_run() as r:
            return r.register_onnx("student.onnx", example, {})

    def alias():
        return client.get_registered_model(tracking.MODEL_NAME).aliases[tracking.MAIN_ALIAS]

    assert register() == "1" and alias() == 1  # `dvc repro` on main
    monkeypatch.setenv("DVC_EXP_NAME", "exp-mse")  # an experiment with an override
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "teacher": {"loss": "ce"}}))
    assert register() == "2" and alias() == 1

    # the nightly flow: an experiment on a detached checkout of main's tip, committed parameters
    git_commit(repo, paths=["params.yaml"])
    run(["git", "checkout", "-q", "--detach"], repo)
    monkeypatch.setenv("DVC_EXP_NAME", "nightly")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", run(["git", "rev-parse", "HEAD"], repo).stdout.strip())
    assert register() == "3" and alias() == 3
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "teacher": {"loss": "ce"}}))
    assert register() == "4" and alias() == 3  # the weekly comparison's seed 1: an override


def test_unreachable_server_warns_once_and_loses_nothing(repo, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with tracking.mlflow_run() as r:
        r.log_metrics({"a": 1.0})
        r.log_curves(repo / "dvclive/teacher", "teacher")
    assert not r.active
    assert capsys.readouterr().err.count("warning: MLflow tracking off") == 1


def runs_of(project):
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, found


def assert_complete(client, runs, epochs):
    """Each run has the test metrics, the curves of every epoch (1..epochs), and its model."""
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"teacher.accuracy", "student.accuracy", "agreement"} <= set(r.data.metrics)
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "student/val/acc")]
        assert steps == list(range(1, epochs + 1))
        versions = client.search_model_versions(f"run_id = '{r.info.run_id}'")
        assert len(versions) == 1, f"run {r.info.run_name} has {len(versions)} model versions"


@pytest.mark.slow
def test_every_execution_logs_one_complete_run_or_none(built, monkeypatch):
    """One complete MLflow run per execution of the pipeline's last stage, also where DVC restored the
    training stages from its run cache; nothing where it does not run (a rerun that reproduces the
    same student)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
    project = built  # `dvc repro` ran and was committed
    epochs = yaml.safe_load((project / "params.yaml").read_text())["student"]["optim"]["epochs"]
    client, logged = runs_of(project)
    assert len(logged) == 1
    assert_complete(client, logged, epochs)
    assert client.get_registered_model(tracking.MODEL_NAME).aliases == {tracking.MAIN_ALIAS: 1}

    run(["dvc", "exp", "run", "-S", "teacher.loss=mse"], project)
    assert len(runs_of(project)[1]) == 2

    # the CE baseline again, queued (run in a temporary copy of the workspace, whose dvc.lock is the
    # MSE variant's): DVC restores the teacher and the student from its run cache; the stages with
    # persistent outputs or outputs in git run again, the last one too: one more run, complete
    run(["dvc", "exp", "run", "--queue", "-S", "teacher.loss=ce"], project)
    run(["dvc", "queue", "start"], project)
    task = wait_for_queue(project, 300).splitlines()[1].split()
    assert task[-1] == "Success", task
    log = run(["dvc", "queue", "logs", task[0]], project).stdout
    for stage in ("train_teacher", "distill"):
        assert f"Stage '{stage}' is cached - skipping run" in log, log
    assert "Running stage 'export_onnx'" in log, log
    client, logged = runs_of(project)
    assert len(logged) == 3
    assert_complete(client, logged, epochs)

    # a change of the training code that does not change the results: the teacher is retrained,
    # bit for bit the same, and the last stage does not run
    losses = project / "src/bayeskd/losses.py"
    losses.write_text(losses.read_text() + "\n# a comment\n")
    assert "Running stage 'train_teacher'" in run(["dvc", "repro"], project).stdout
    client, logged = runs_of(project)
    assert len(logged) == 3
    assert_complete(client, logged, epochs)
    assert {r.data.params["teacher.loss"] for r in logged} == {"ce", "mse"}

    # tracking that fails costs no output: the last stage still writes them and succeeds
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    result = run(["dvc", "repro", "--force", "--single-item", "export_onnx"], project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "MLflow tracking off" in result.stderr + result.stdout
    assert json.loads((project / "reports/export.json").read_text())["student"]["max_abs_diff"] <= 1e-4
    assert len(runs_of(project)[1]) == 3
