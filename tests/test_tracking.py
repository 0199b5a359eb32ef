import json
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
import yaml

from bayeskd import export, nets, tracking
from conftest import ROOT, run
from services import free_port


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
    with tracking.mlflow_run(final=True) as r:
        assert r.register_onnx("student.onnx", example, {"student": {"accuracy": 0.5}}) == "1"
        r.log_metrics({"teacher": {"accuracy": 0.6}})
        assert r.log_restored_curves({"teacher": repo / "dvclive/teacher"}) == ["teacher"]
        r.log_artifacts("reports")
        first = r.run_id

    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.KIND_TAG] == "custom_model_development"  # for UIs that read it
    got = client.get_run(first)
    assert got.info.status == "FINISHED"
    assert got.data.params["teacher.loss"] == "mse" and got.data.params["seed"] == "0"
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert got.data.tags["git.commit"] == commit
    assert got.data.tags["dvc.experiment"] == "" and "data.hash" in got.data.tags
    assert got.data.tags["git.branch"] == "main"
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
    assert client.get_registered_model(tracking.MODEL_NAME).aliases == {"main": 1}
    assert not (repo / tracking.RUN_FILE).exists()  # the last stage: the next execution starts anew


def test_only_runs_of_main_register_and_move_its_alias(repo, monkeypatch):
    example = student_onnx(repo / "student.onnx")
    client = mlflow.MlflowClient(tracking.tracking_uri())

    def register():
        with tracking.mlflow_run(final=True) as r:
            return r.register_onnx("student.onnx", example, {})

    def alias(name="main"):
        return client.get_registered_model(tracking.MODEL_NAME).aliases.get(name)

    assert register() == "1" and alias() == 1  # `dvc repro` on main
    monkeypatch.setenv("DVC_EXP_NAME", "exp-mse")  # an experiment with an override: logged, not registered
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "teacher": {"loss": "ce"}}))
    assert register() is None and alias() == 1
    logged = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                                filter_string="tags.`dvc.experiment` = 'exp-mse'")
    assert len(logged) == 1 and client.search_logged_models(
        [logged[0].info.experiment_id])  # its ONNX model is logged with the run

    # the nightly flow: an experiment on a detached checkout of main's tip, committed parameters
    git_commit(repo, paths=["params.yaml"])
    run(["git", "checkout", "-q", "--detach"], repo)
    monkeypatch.setenv("DVC_EXP_NAME", "nightly")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", run(["git", "rev-parse", "HEAD"], repo).stdout.strip())
    assert register() == "2" and alias() == 2
    nightly = client.get_run(client.get_model_version(tracking.MODEL_NAME, "2").run_id)
    assert nightly.data.tags["git.branch"] == "main"  # the experiment's branch, not `HEAD`
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "teacher": {"loss": "ce"}}))
    assert register() is None and alias() == 2  # the weekly comparison's seed 1: an override

    # another register branch, with an alias of its name
    git_commit(repo, paths=["params.yaml"])
    monkeypatch.setenv("BAYESKD_REGISTER_BRANCH", "release/1")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", run(["git", "rev-parse", "HEAD"], repo).stdout.strip())
    assert register() is None  # main's tip is no longer a run of the register branch
    run(["git", "branch", "release/1"], repo)
    assert register() == "3" and alias("release-1") == 3 and alias() == 2


def test_one_run_across_the_stages_of_an_execution_with_live_curves(repo):
    """Stages of one execution (one DVC process; here this test's process) share one run: the first
    training stage starts it, each epoch is in it as soon as it ends, the next stage resumes it
    (a retried stage does not log its epochs twice), the last one closes it."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    with tracking.mlflow_run() as teacher:
        teacher.log_epoch("teacher", 0, {"train/loss": 1.0, "lr": 0.1})
        live = client.get_run(teacher.run_id)
        assert live.info.status == "RUNNING" and live.data.metrics == {"teacher/train/loss": 1.0,
                                                                        "teacher/lr": 0.1}
        teacher.log_epoch("teacher", 1, {"train/loss": 0.5, "lr": 0.1})
    assert client.get_run(teacher.run_id).info.status == "FINISHED"
    with tracking.mlflow_run() as retried:  # the same stage again (a retry): the same run
        for epoch, loss in enumerate((1.0, 0.5, 0.25)):
            retried.log_epoch("teacher", epoch, {"train/loss": loss, "lr": 0.1})
    history = client.get_metric_history(teacher.run_id, "teacher/train/loss")
    assert retried.run_id == teacher.run_id
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    with tracking.mlflow_run(final=True) as last:
        assert last.run_id == teacher.run_id
        assert last.log_restored_curves({"teacher": "dvclive/teacher"}) == []  # it trained here
    assert client.get_run(teacher.run_id).info.status == "FINISHED"
    with tracking.mlflow_run(final=True) as fresh:
        assert fresh.run_id != teacher.run_id


def test_a_run_that_does_not_complete_ends_failed_or_killed(repo):
    client = mlflow.MlflowClient(tracking.tracking_uri())
    with pytest.raises(RuntimeError), tracking.mlflow_run(final=True) as failed:
        raise RuntimeError("the stage's own error")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracking.mlflow_run(final=True) as stopped:
        raise KeyboardInterrupt
    assert client.get_run(stopped.run_id).info.status == "KILLED"

    with tracking.mlflow_run() as trained:  # a training stage ends; a later, untracked stage fails
        pass
    tracking.end_execution("FAILED")
    assert client.get_run(trained.run_id).info.status == "FAILED"

    # an execution killed outright (SIGKILL) leaves its run RUNNING: the next one here ends it
    left = client.create_run(client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id)
    (repo / tracking.RUN_FILE).write_text(json.dumps({"run_id": left.info.run_id, "execution": "dvc-1-0.0",
                                                      "tracking_uri": tracking.tracking_uri()}))
    with tracking.mlflow_run(final=True) as later:
        assert later.run_id != left.info.run_id
    assert client.get_run(left.info.run_id).info.status == "KILLED"


def test_a_stage_stopped_by_sigterm_marks_its_run_killed(repo):
    """What a cancelled flow run or a stopped container sends: the stage marks the execution's run
    KILLED, then ends by the signal, as it would have (Prefect retries stages killed by signals)."""
    script = repo / "stopped.py"
    script.write_text(f"""import sys, time
sys.path.insert(0, {str(ROOT / "stages")!r})
from common import stage
from bayeskd import tracking

def main():
    with tracking.mlflow_run():
        print("training", flush=True)
        time.sleep(120)

stage(main)
""")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=repo, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "training\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    client = mlflow.MlflowClient(tracking.tracking_uri())
    found = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert [r.info.status for r in found] == ["KILLED"]


def test_unreachable_server_warns_once_and_loses_nothing(repo, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with tracking.mlflow_run() as r:
        r.log_epoch("teacher", 0, {"train/loss": 1.0})
        r.log_metrics({"a": 1.0})
        r.log_restored_curves({"teacher": repo / "dvclive/teacher"})
    assert not r.active
    assert capsys.readouterr().err.count("warning: MLflow tracking off") == 1


def test_a_stage_that_loses_the_race_to_create_the_experiment_still_tracks_into_it(repo, monkeypatch):
    """Two workers whose first stages start at once both find no `bayeskd` experiment and both
    create it; MLflow hands the loser the experiment without making it active. Its run still goes
    into the experiment (not into MLflow's Default one), and its next stage resumes it. The script
    replays that order in a fresh process: the other worker creates the experiment just after this
    one looked it up."""
    script = repo / "raced.py"
    script.write_text("""import json, sys
import mlflow
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from bayeskd import tracking

lookup = TrackingServiceClient.get_experiment_by_name

def raced(self, name):
    TrackingServiceClient.get_experiment_by_name = lookup
    mlflow.MlflowClient(tracking.tracking_uri()).create_experiment(name)  # the other worker's
    return None  # what this one's lookup found, a moment earlier

TrackingServiceClient.get_experiment_by_name = raced
with tracking.mlflow_run() as run:
    run.log_epoch("teacher", 0, {"train/loss": 1.0})
print(json.dumps(run.run_id))
""")
    monkeypatch.setenv("BAYESKD_EXECUTION", "flow-run-1")  # the script and this test: one execution
    out = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, check=True)
    assert "warning" not in out.stderr, out.stderr
    run_id = json.loads(out.stdout.splitlines()[-1])
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert client.get_run(run_id).info.experiment_id == experiment.experiment_id
    with tracking.mlflow_run(final=True) as last:  # the next stage of the same execution
        assert last.run_id == run_id
