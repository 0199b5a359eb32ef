"""The team's stack for real, on this machine, as the docs' Topology runs it: a PostgreSQL server,
an S3 endpoint, MLflow's tracking server on PostgreSQL with its artifacts in S3, Prefect's server on
PostgreSQL, a bare git origin with the DVC remote on S3 committed, a work pool and two workers, each
cloning the origin for its flow runs. The CE-vs-MSE comparison runs through the nightly deployment,
one variant on each worker; then a fresh clone fetches the experiments, pulls their outputs from S3
and compares them, and MLflow holds both runs with their curves and artifacts."""

import contextlib
import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL, temporary_settings

import services
from bayeskd import tracking
from conftest import BIN, exp_refs, run

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command of the Topology, in `env`, which must succeed."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def stack(tmp_path):
    """The servers, and the environment every machine of the team has (their addresses, S3 keys)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    home = tmp_path / "prefect-home"
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(services.postgres(("mlflow", "prefect"), logs))
        s3 = stack.enter_context(services.s3(logs))
        mlflow_url, api = stack.enter_context(services.running(
            logs, services.mlflow_server(f"{db}/mlflow", s3), services.prefect_server(f"{db}/prefect", home)))
        yield s3, logs, os.environ | services.S3_KEYS | {
            "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1",
            "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": mlflow_url}


def test_team_stack_compares_on_two_workers_and_a_fresh_clone_sees_it_all(project, stack, tmp_path):
    s3, logs, env = stack
    # once, in the project: the team's DVC remote, committed; the bare origin everyone clones
    run(["dvc", "remote", "add", "-d", "shared", f"s3://{services.BUCKET}/dvc"], project)
    run(["dvc", "remote", "modify", "shared", "endpointurl", s3], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "DVC remote on S3"], project)
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(project), str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], project)
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    prefect = f"{BIN}/prefect"
    sh([prefect, "work-pool", "create", "gpu", "--type", "process"], project, env)
    sh([prefect, "--no-prompt", "deploy", "--all"], project, env | {"BAYESKD_GIT_URL": str(origin)})
    workers = []
    # both workers ask for the first variant; the one that loses the race asks again for the second
    # after PREFECT_WORKER_QUERY_SECONDS, 2 s here instead of Prefect's 10
    worker_env = env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
    try:
        for name in ("w1", "w2"):
            (tmp_path / name).mkdir()
            workers.append(services.start([prefect, "worker", "start", "--pool", "gpu", "--name", name,
                                           "--limit", "1"], worker_env, tmp_path / name,
                                          logs / f"{name}.log"))
        started = time.monotonic()
        sh([f"{BIN}/python", "-m", "flows.compare", "seeds=[0]", "deployment=bayeskd-pipeline/nightly"],
           project, env, timeout=1800)
        compared = time.monotonic() - started
    finally:
        for w in workers:
            services.stop(w)
    print(f"the comparison through the deployment took {compared:.0f} s")
    table = (project / "reports/compare/table.md").read_text()
    assert "| ce | 1 |" in table and "| mse | 1 |" in table
    names = {f"{loss}-seed0-{commit[:7]}" for loss in ("ce", "mse")}

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == {"nightly", "weekly-comparison"}
        assert all(d.work_pool_name == "gpu" and d.schedules and not d.paused for d in deployments.values())
        variants = [r for r in client.read_flow_runs() if r.name in names]
        assert len(variants) == 2 and all(v.state.is_completed() for v in variants)
        a, b = sorted(variants, key=lambda r: r.start_time)
        assert b.start_time < a.end_time, "the two variants did not run at the same time"
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["bayeskd-comparison"])))
        assert found and "CE vs MSE" in found[-1].data
        published = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["bayeskd-metrics"])))  # each variant's flow run publishes its metrics
        shown = {n for n in names for a in published if n in a.data and "| teacher.bcpd_mse |" in a.data}
        assert shown == names
    # each worker took one variant, in a clone of the origin of its own
    for name in ("w1", "w2"):
        log = (logs / f"{name}.log").read_text()
        assert sum(f"Flow run '{v.name}' - Finished in state Completed()" in log for v in variants) == 1, log
        assert "Deployment step 'git_clone' completed successfully" in log

    # a fresh clone: the experiments from the git remote, their outputs from S3
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(origin), str(fresh)], tmp_path)
    out = sh([f"{BIN}/bayeskd", "compare", "--remote", "origin", "--format", "csv"], fresh, env).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ce, mse = sorted(names)
    refs = exp_refs(fresh)
    assert set(refs) == names  # fetched
    for name, ref in refs.items():  # each variant's student, as its worker measured it, is in the table
        metrics = json.loads(run(["git", "show", f"{ref}:reports/metrics.json"], fresh).stdout)
        assert any(r["teacher_loss"] == name.split("-")[0] and r["seeds"] == "1" and float(
            r["student_accuracy_mean"]) == pytest.approx(metrics["student"]["accuracy"]) for r in rows), out
    # the pull-request comment's Markdown, from another fresh clone: the same fetch first
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    md = sh([f"{BIN}/bayeskd", "diff", "--remote", "origin", "HEAD"], other, env).stdout
    assert "| mse | 1 |" in md.split("### CE- vs MSE-trained teachers")[1]
    sh(["dvc", "exp", "pull", "origin", ce, mse], fresh, env)
    diff = json.loads(run(["dvc", "metrics", "diff", ce, mse, "--json"], fresh).stdout)
    assert "teacher.bcpd_mse" in diff["reports/metrics.json"]
    shown = sh(["dvc", "plots", "diff", ce, mse, "-o", "plots"], fresh, env)
    assert "failed to load" not in shown.stdout + shown.stderr
    html = (fresh / "plots/index.html").read_text()
    assert "dvclive_teacher_plots_metrics_val_acc_tsv" in html and ce in html and mse in html
    sh(["dvc", "exp", "apply", mse], fresh, env)  # its models come from S3, through the local cache
    assert (fresh / "models/student.onnx").stat().st_size > 0
    assert "up to date" in sh(["dvc", "status"], fresh, env).stdout

    # MLflow: both runs, complete, their artifacts in S3 through the server
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = {r.data.tags["dvc.experiment"]: r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("dvc.experiment") in names}
    assert set(runs) == names
    for name, r in runs.items():
        assert r.info.status == "FINISHED" and r.data.tags["git.branch"] == "main"
        assert r.data.params["teacher.loss"] == name.split("-")[0] and r.data.params["seed"] == "0"
        for role in ("teacher", "student"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, f"{role}/val/acc")]
            assert steps == [1, 2, 3]
        assert "student.accuracy" in r.data.metrics
        assert "reports/metrics.json" in [a.path for a in client.list_artifacts(r.info.run_id, "reports")]
        assert r.data.tags.get("mlflow.parentRunId"), "not a child of the comparison's run"
    # main's own configuration (CE, seed 0) registers its student; the MSE variant does not
    version = client.get_model_version_by_alias(tracking.MODEL_NAME, "main")
    assert version.run_id == runs[ce].info.run_id
    assert not client.search_model_versions(f"run_id = '{runs[mse].info.run_id}'")
    objects = services.s3_client(s3).list_objects_v2(Bucket=services.BUCKET, Prefix="mlflow/")
    assert any(o["Key"].endswith("reports/metrics.json") for o in objects.get("Contents", []))
