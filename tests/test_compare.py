"""`bayeskd compare` and `bayeskd diff` on a real project: a commit, a queued CE/MSE seed sweep, a
second commit; with the MLflow store that the runs filled."""

import csv
import io
import json
import re
import statistics

import mlflow
import pytest
import yaml

from bayeskd import tracking
from conftest import commit_all, run, wait_for_queue

pytestmark = pytest.mark.slow


def files_at(project, ref):
    """params.yaml and reports/metrics.json as git holds them at `ref` (DVC not involved)."""
    show = lambda path: run(["git", "show", f"{ref}:{path}"], project).stdout  # noqa: E731
    return yaml.safe_load(show("params.yaml")), json.loads(show("reports/metrics.json"))


def test_seed_sweep_compare_diff_and_tracking(built):
    project = built  # `dvc repro` ran and was committed
    first = run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    run(["dvc", "exp", "run", "--queue", "-S", "teacher.loss=ce,mse", "-S", "seed=0,1"], project)
    run(["dvc", "queue", "start"], project)
    wait_for_queue(project, 600)
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    exp_names = {r.rsplit("/", 1)[1] for r in refs}
    assert len(exp_names) == 4

    accuracy, ece = {}, {}  # (loss, seed) -> student accuracy; ce seed -> teacher ECE (git's files)
    for ref in [first, *refs]:
        params, metrics = files_at(project, ref)
        accuracy[params["teacher"]["loss"], params["seed"]] = metrics["student"]["accuracy"]
        if params["teacher"]["loss"] == "ce":
            ece[params["seed"]] = metrics["teacher"]["ece"]
    assert set(accuracy) == {(loss, seed) for loss in ("ce", "mse") for seed in (0, 1)}

    out = run(["bayeskd", "compare", "--format", "csv", "--plot", "reports/compare"], project).stdout
    rows = {r["teacher_loss"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {"ce", "mse"} and rows["mse"]["seeds"] == "2"
    assert float(rows["mse"]["student_accuracy_mean"]) == pytest.approx(
        statistics.fmean([accuracy["mse", 0], accuracy["mse", 1]]))
    diffs = [accuracy["mse", s] - accuracy["ce", s] for s in (0, 1)]
    assert float(rows["mse"]["diff_vs_ce_mean"]) == pytest.approx(statistics.fmean(diffs))
    assert float(rows["mse"]["diff_vs_ce_ci_low"]) < statistics.fmean(diffs) < float(
        rows["mse"]["diff_vs_ce_ci_high"])
    assert (project / "reports/compare/student_vs_teacher.png").stat().st_size > 10_000
    assert "± " in run(["bayeskd", "compare"], project).stdout  # the terminal table

    # Other code, same parameters (as after `make run` on another machine): the workspace's
    # evaluation takes one more ECE bin. Its run is shown apart, the sweep's pairs stay intact.
    evaluate = project / "stages/evaluate.py"
    code = evaluate.read_text()
    evaluate.write_text(code.replace("bins = p.evaluate.ece_bins", "bins = p.evaluate.ece_bins + 1"))
    run(["dvc", "repro"], project)
    result = run(["bayeskd", "compare", "--format", "csv"], project)
    rows = {(r["configuration"].rsplit(" [", 1)[1].rstrip("]"), r["teacher_loss"]): r
            for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == {("experiments of main", "ce"), ("experiments of main", "mse"), ("workspace", "ce")}
    assert rows["experiments of main", "mse"]["diff_vs_ce_n"] == "2"
    assert float(rows["experiments of main", "ce"]["teacher_ece"]) == pytest.approx(statistics.fmean(
        [ece[s] for s in (0, 1)]))
    workspace = json.loads((project / "reports/metrics.json").read_text())
    assert float(rows["workspace", "ce"]["teacher_ece"]) == pytest.approx(workspace["teacher"]["ece"])
    assert "have the same parameters but different metrics" in result.stderr
    command = re.search(r"compare them: `(dvc exp diff [^`]+)`", result.stderr).group(1)
    assert "teacher.ece" in run(command.split(), project).stdout  # the command compares the two
    evaluate.write_text(code)
    run(["dvc", "repro"], project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["student"]["method"] = "none"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)
    second = commit_all(project, "baseline student")

    md = run(["bayeskd", "diff", first, second], project).stdout
    assert md.startswith("<!-- bayeskd-metrics-diff -->")
    params_section = md.split("### Parameters")[1].split("### Metrics")[0]
    assert "student.method" in params_section and "kd" in params_section and "none" in params_section
    metrics_section = md.split("### Metrics")[1].split("### CE-")[0]
    assert "student.accuracy" in metrics_section
    table = md.split("### CE- vs MSE-trained teachers")[1]
    assert "student.method=kd" in table and "student.method=none" in table

    # MLflow: the queued runs, executed in temporary copies, logged into the project's store
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    logged = client.search_runs([experiment.experiment_id])
    tagged = {r.data.tags["dvc.experiment"] for r in logged}
    assert "" in tagged and len(tagged & exp_names) >= 3  # (ce, 0) is the baseline: nothing reruns
    alias = client.get_model_version_by_alias(tracking.MODEL_NAME, "main")
    latest_main = client.get_run(alias.run_id)
    assert latest_main.data.tags["dvc.experiment"] == ""
    assert latest_main.data.params["student.method"] == "none"
