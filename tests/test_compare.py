"""The default pipeline through DVC on a copy of the project (`dvc repro`, committed; a fresh clone
sees its metrics and plots), an MSE experiment beside it (`dvc metrics diff`, `dvc plots diff`), and
on from there `bayeskd compare` and `bayeskd diff`: a CE/MSE seed sweep (that experiment in the
workspace, the rest queued), a second commit; and the MLflow store that the runs
filled: one run per execution of the pipeline, complete where its last stage runs (also where DVC
restored the training stages from its run cache, and the run says so), with the curves of what it
retrained where the last stage has nothing to do; only runs of main register a model."""

import csv
import io
import json
import re
import statistics

import mlflow
import pytest
import yaml

from bayeskd import tracking
from bayeskd.report import runs_in
from conftest import commit_all, exp_refs, run, start_queue, wait_for_queue

pytestmark = pytest.mark.slow


def files_at(project, ref):
    """params.yaml and reports/metrics.json as git holds them at `ref` (DVC not involved)."""
    show = lambda path: run(["git", "show", f"{ref}:{path}"], project).stdout  # noqa: E731
    return yaml.safe_load(show("params.yaml")), json.loads(show("reports/metrics.json"))


def runs_of(project):
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, found


def assert_complete(client, runs, epochs):
    """Each run has the test metrics, the curves of every epoch (1..epochs), and its logged model."""
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["git.branch"] == "main"
        assert {"teacher.accuracy", "student.accuracy", "agreement"} <= set(r.data.metrics)
        for role in ("teacher", "student"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, f"{role}/val/acc")]
            assert steps == list(range(1, epochs[role] + 1))
        assert client.search_logged_models([r.info.experiment_id],
                                           filter_string=f"source_run_id = '{r.info.run_id}'")


def registered(client, run):
    return [int(v.version) for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")]


def check_the_default_run(project):
    """The built project: `dvc repro` of the default, committed; a fresh clone (no DVC remote, no
    cache) shows the commit's metrics, plots and curves, which are in git."""
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


def check_the_mse_experiment(project):
    """`dvc exp run -S teacher.loss=mse` in the workspace: beside the CE run in `dvc exp show`, its
    metrics in the workspace, `dvc metrics diff` and `dvc plots diff` against the CE commit."""
    runs = runs_in(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    by_loss = {r.params["teacher"]["loss"]: r.metrics for r in runs}
    assert set(by_loss) == {"ce", "mse"}
    assert by_loss["ce"]["teacher"]["bcpd_mse"] != by_loss["mse"]["teacher"]["bcpd_mse"]
    assert by_loss["mse"] == json.loads((project / "reports/metrics.json").read_text())

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert "teacher.bcpd_mse" in diff["reports/metrics.json"]
    out = project.parent / "mse_plots"  # outside the workspace, which git must find clean later
    shown = run(["dvc", "plots", "diff", "HEAD", "-o", str(out)], project)
    assert "failed to load" not in shown.stdout + shown.stderr
    html = (out / "index.html").read_text()
    plots = re.findall(r'<div id = "([^"]+)">', html)  # only the declared charts
    assert plots[:5] == ["validation_accuracy", "validation_nll", "training_accuracy", "reliability",
                         "student_confusion"]
    curves = {f"dvclive_{role}_plots_metrics_{curve}_tsv" for role in ("teacher", "student")
              for curve in ("lr", "train_acc", "train_loss", "val_acc", "val_nll")}
    assert curves <= set(plots[5:]) and all(p.startswith("dvclive_") for p in plots[5:])
    assert "<script src=" not in html and "vegaEmbed" in html  # scripts inlined: renders offline
    assert len(html) < 2_000_000


def test_seed_sweep_compare_diff_and_tracking(built, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
    project = built  # `dvc repro` ran on main and was committed ("ce baseline")
    first = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    params = yaml.safe_load((project / "params.yaml").read_text())
    epochs = {role: params[role]["optim"]["epochs"] for role in ("teacher", "student")}
    client, logged = runs_of(project)
    assert len(logged) == 1
    assert_complete(client, logged, epochs)
    assert registered(client, logged[0]) == [1]
    assert client.get_registered_model(tracking.MODEL_NAME).aliases == {"main": 1}
    assert not (project / tracking.RUN_FILE).exists()
    check_the_default_run(project)

    # the sweep: (mse, 0) in the workspace, an override, so it registers nothing
    run(["dvc", "exp", "run", "-S", "teacher.loss=mse"], project)
    check_the_mse_experiment(project)
    client, logged = runs_of(project)
    mse = next(r for r in logged if r.data.params["teacher.loss"] == "mse")
    assert len(logged) == 2 and registered(client, mse) == []
    # the rest queued, each run in a temporary copy of the workspace, whose dvc.lock is now the MSE
    # variant's. (ce, 0) is main's own configuration at main's tip: DVC restores its teacher and
    # student from its run cache, the stages with persistent outputs or outputs in git run, the last
    # one too; one more run, complete, that says where its models come from, and it registers
    for loss, seed in (("ce", 0), ("ce", 1), ("mse", 1)):
        run(["dvc", "exp", "run", "--queue", "-S", f"teacher.loss={loss}", "-S", f"seed={seed}"], project)
    start_queue(project)
    status = wait_for_queue(project, 1200, experiments=3)
    assert status.count("Success") == 3, status
    refs = exp_refs(project)
    assert len(refs) == 4
    variant = {}  # (loss, seed) -> experiment name
    for name, ref in refs.items():
        p, _ = files_at(project, ref)
        variant[p["teacher"]["loss"], p["seed"]] = name
    log = run(["dvc", "queue", "logs", variant["ce", 0]], project).stdout
    for stage in ("train_teacher", "distill"):
        assert f"Stage '{stage}' is cached - skipping run" in log, log
    assert "Running stage 'export_onnx'" in log, log
    client, logged = runs_of(project)
    assert len(logged) == 5
    assert_complete(client, logged, epochs)
    by_exp = {r.data.tags["dvc.experiment"]: r for r in logged}
    restored = by_exp[variant["ce", 0]]
    assert restored.data.tags[tracking.RESTORED_TAG] == "teacher,student"
    assert "Not trained in this execution" in restored.data.tags["mlflow.note.content"]
    assert registered(client, restored) == [2]
    assert all(registered(client, by_exp[variant[v]]) == [] for v in variant if v != ("ce", 0))

    # back to HEAD, as the README says: the MSE teacher's curve that git does not know goes too
    run(["git", "checkout", "--", "."], project)
    run(["git", "clean", "-fdq", "dvclive"], project)
    run(["dvc", "checkout", "--force"], project)
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."
    assert run(["git", "status", "--porcelain"], project).stdout == ""

    accuracy, ece = {}, {}  # (loss, seed) -> student accuracy; ce seed -> teacher ECE (git's files)
    for ref in [first, *refs.values()]:
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

    # a change of the training code that does not change the results: teacher and student are
    # retrained, bit for bit the same, live in a run of their own, and the last stage does not run
    before = len(runs_of(project)[1])
    losses = project / "src/bayeskd/losses.py"
    losses.write_text(losses.read_text() + "\n# a comment\n")
    assert "Running stage 'train_teacher'" in run(["dvc", "repro"], project).stdout
    client, logged = runs_of(project)
    assert len(logged) == before + 1
    retrained = max(logged, key=lambda r: r.info.start_time)
    assert retrained.info.status == "FINISHED" and "student.accuracy" not in retrained.data.metrics
    assert [m.step for m in client.get_metric_history(retrained.info.run_id, "student/val/acc")] == [
        *range(1, epochs["student"] + 1)]
    assert registered(client, retrained) == []

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
    assert "-> mlp_student (kd)" in table and "-> mlp_student (none)" in table  # the configurations

    # MLflow: the queued runs, executed in temporary copies, logged into the project's store
    client, logged = runs_of(project)
    tagged = {r.data.tags["dvc.experiment"] for r in logged}
    assert "" in tagged and set(refs) <= tagged
    alias = client.get_model_version_by_alias(tracking.MODEL_NAME, "main")
    latest_main = client.get_run(alias.run_id)
    assert latest_main.data.tags["dvc.experiment"] == ""
    assert latest_main.data.params["student.method"] == "none"

    bad = run(["dvc", "exp", "run", "-S", "teacher.loss=hinge"], project, check=False)
    assert bad.returncode != 0
    expected = "teacher.loss = 'hinge': not allowed; expected 'ce', 'mse', 'ls' or 'ce_ts'"
    assert expected in bad.stdout + bad.stderr
