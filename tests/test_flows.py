"""Prefect flows under prefect_test_harness, and from the command line without a server. The
deployments, a work pool and its workers on a real server: tests/test_team.py."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml
from prefect.testing.utilities import prefect_test_harness

from bayeskd import flows
from bayeskd.config import ParamsError
from conftest import BIN, exp_refs, run
from services import start

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_bad_override_fails_before_any_stage(project, harness):
    with pytest.raises(ParamsError, match="teacher.optim.epochs = 'many'"):
        flows.pipeline(repo=str(project), set_params={"teacher.optim.epochs": "many"}, push=False)
    assert not (project / flows.WORKSPACES).exists()


def test_failing_stage_fails_the_run_with_its_own_error(project, harness, tmp_path):
    state = flows.pipeline(repo=str(project), set_params={"teacher.net": "cnn_teacher"},
                           push=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(flows.StageFailed) as e:
        state.result()
    assert e.value.stage == "train_teacher" and e.value.exit_code == 2 and not e.value.transient
    assert "teacher.net = 'cnn_teacher' does not fit dataset 'gaussian'" in str(e.value)
    kept = [p for p in (project / flows.WORKSPACES).iterdir() if p.is_dir()]
    assert len(kept) == 1 and (kept[0] / "data/prepared/train.npz").exists()  # kept to resume


def test_a_damaged_copy_in_the_dvc_cache_fails_the_run_before_any_stage(project, harness):
    """DVC restores a cached copy as it is; the flow checks the copies of the outputs dvc.lock names
    before the first stage, and names the damaged one."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    md5 = next(o["md5"] for o in lock["train_teacher"]["outs"] if o["path"] == "models/teacher.safetensors")
    obj = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"not the teacher")
    state = flows.pipeline(repo=str(project), push=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(flows.DamagedFiles, match="models/teacher.safetensors: the DVC cache's copy .* is "
                       "damaged .* `rm -f .* && dvc repro`"):
        state.result()
    kept = [p for p in (project / flows.WORKSPACES).iterdir() if p.is_dir()]
    assert len(kept) == 1 and not (kept[0] / "data/prepared").exists()  # no stage ran
    assert set(run(["git", "status", "--porcelain"], kept[0]).stdout.splitlines()) <= {" M params.yaml"}


def test_one_workspace_per_flow_run(tmp_path):
    with flows.locked_workspace(tmp_path, "abc") as ws:
        with pytest.raises(RuntimeError, match="another flow run is using the workspace"):
            with flows.locked_workspace(tmp_path, "abc"):
                pass
    with flows.locked_workspace(tmp_path, "abc") as again:  # released afterwards
        assert again == ws


def test_killed_flow_run_leaves_no_partial_output_and_its_rerun_resumes(project, tmp_path):
    """`python -m flows.pipeline key=value` without a Prefect server, killed while the teacher
    trains, then run again."""
    env = os.environ | {"PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1",
                        "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    run(["dvc", "remote", "add", "--local", "-d", "shared", str(tmp_path / "dvc-remote")], project)
    args = [sys.executable, "-m", "flows.pipeline", "teacher.loss=ls", "data.gaussian.n_samples=20000",
            "data.gaussian.train_fraction=0.8", "teacher.optim.epochs=6", "teacher.optim.milestones=[4]",
            "student.optim.epochs=1", "student.optim.milestones=[]"]
    first = start(args, env, project, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    ckpt = None
    while first.poll() is None and time.monotonic() < deadline:
        found = list((project / flows.WORKSPACES).glob("*/checkpoints/teacher.pt"))
        if found and len(torch.load(found[0], weights_only=True)["history"]) >= 2:
            ckpt = found[0]
            os.killpg(first.pid, signal.SIGKILL)  # the worker dies: flow, stage and all
            break
        time.sleep(0.05)
    first.wait()
    assert ckpt is not None, (tmp_path / "first.log").read_text()[-3000:]
    workspace = ckpt.parents[1]
    assert not (workspace / "models/teacher.safetensors").exists()

    second = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "teacher[ls]: resuming after epoch" in second.stdout + second.stderr
    assert not workspace.exists()  # the workspace of a success is removed
    assert any(n.startswith("ls-seed0-") for n in exp_refs(project))
    assert '"loss": "ls"' in run(["dvc", "exp", "show", "--json"], project).stdout
    assert any((tmp_path / "dvc-remote").rglob("*")), "outputs were not pushed to the DVC remote"
    assert run(["git", "status", "--porcelain"], project).stdout == ""  # the user's tree untouched
    # MLflow: the killed execution's run is KILLED; the rerun's has every epoch once
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bayeskd").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    done = next(r for r in runs if r.info.status == "FINISHED")
    assert done.data.tags["dvc.experiment"].startswith("ls-seed0-")
    history = client.get_metric_history(done.info.run_id, "teacher/train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
