import csv
import io
import math
from dataclasses import replace

import pytest
import yaml
from scipy.stats import t

from bayeskd import report


def run(rev, loss, seed, student, teacher_ece=0.1, bcpd=0.05, method="kd"):
    params = {"seed": seed, "data": {"name": "gaussian"},
              "teacher": {"net": "mlp_teacher", "loss": loss},
              "student": {"net": "mlp_student", "method": method}, "export": {"opset": 18}}
    metrics = {"teacher": {"accuracy": 0.5, "ece": teacher_ece, "bcpd_mse": bcpd},
               "student": {"accuracy": student}}
    return report.Run(rev, params, metrics)


RUNS = [
    run("a", "ce", 0, 0.50), run("b", "ce", 1, 0.52), run("c", "ce", 2, 0.51),
    run("d", "mse", 0, 0.51), run("e", "mse", 1, 0.55), run("f", "mse", 2, 0.53),
    run("g", "mse", 0, 0.60, method="none"),
]


def test_paired_difference_and_t_interval():
    rows = report.summarise(RUNS)
    assert [(r.config.split(" ")[-1], r.loss, r.seeds) for r in rows] == [
        ("student.method=kd", "ce", [0, 1, 2]), ("student.method=kd", "mse", [0, 1, 2]),
        ("student.method=none", "mse", [0])]
    ce, mse, single = rows
    assert mse.diff == pytest.approx([0.01, 0.03, 0.02])
    lo, hi = report.t_interval(mse.diff)
    half = t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # mean 0.02, sd 0.01
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert ce.diff == [] and single.diff == []  # no CE run to pair with: shown, without interval
    assert report.t_interval([0.1]) is None


def test_formats_carry_the_same_numbers():
    rows = report.summarise(RUNS)
    md, table = report.to_markdown(rows), report.to_table(rows)
    for text in (md, table):
        assert "0.5300 ± 0.0200" in text and "+0.0200 [" in text and "(n=3)" in text
    assert md.count("\n") == 2 + len(rows)
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(rows))))
    assert parsed[1]["teacher_loss"] == "mse" and float(parsed[1]["diff_vs_ce_mean"]) == pytest.approx(0.02)
    assert parsed[2]["student_accuracy_sd"] == "" and parsed[2]["diff_vs_ce_n"] == ""


def test_a_run_listed_twice_counts_once_under_its_commit_name():
    head = [replace(r, origin="main") for r in RUNS]
    workspace = replace(run("workspace", "ce", 0, 0.50), origin="workspace")  # holds commit a
    kept = report.unique([workspace, *head])
    assert sorted(r.rev for r in kept) == sorted(r.rev for r in RUNS) and {r.source for r in kept} == {""}


KD, NONE = (f"gaussian: mlp_teacher -> mlp_student ({m}) student.method={m}" for m in ("kd", "none"))


def test_runs_from_another_machine_are_shown_apart_by_origin():
    """`make run` on another machine: the workspace re-ran main's configuration and got other
    weights. Its row is shown beside main's: not pooled, nor dropped."""
    head = [replace(r, origin="main") for r in RUNS]
    workspace = replace(run("workspace", "ce", 0, 0.49), origin="workspace")
    with pytest.warns(UserWarning, match=r"a and workspace have the same parameters but different "
                      r"metrics \(other code, or another machine\).*shown apart.*`dvc exp diff a`"):
        rows = report.summarise([workspace, *head])
    assert {(r.config, r.loss): r.student_accuracy for r in rows} == {
        (f"{KD} [main]", "ce"): [0.50, 0.52, 0.51], (f"{KD} [main]", "mse"): [0.51, 0.55, 0.53],
        (f"{KD} [workspace]", "ce"): [0.49],
        (NONE, "mse"): [0.60]}  # no conflict in this configuration: not split, not labelled
    assert "[workspace]" in report.to_table(rows)


def test_a_commit_from_another_machine_and_experiments_run_here_are_shown_apart():
    """The issue's case: main's committed run came from another machine; its experiments, the
    seed sweep, ran here, and the one equal to main disagrees with it."""
    main = replace(run("main", "ce", 0, 0.50), origin="main")
    here = [replace(r, origin="experiments of main") for r in
            (run("x0", "ce", 0, 0.49), run("x1", "ce", 1, 0.52), run("y0", "mse", 0, 0.51),
             run("y1", "mse", 1, 0.54))]
    with pytest.warns(UserWarning, match=r"x0 and main have the same parameters.*`dvc exp diff x0 main`"):
        rows = report.summarise([main, *here])
    kd = "gaussian: mlp_teacher -> mlp_student (kd)"
    assert [(r.config, r.loss, r.student_accuracy, r.diff) for r in rows] == [
        (f"{kd} [experiments of main]", "ce", [0.49, 0.52], []),
        (f"{kd} [experiments of main]", "mse", [0.51, 0.54], pytest.approx([0.02, 0.02])),
        (f"{kd} [main]", "ce", [0.50], [])]


def test_a_conflict_within_one_revision_keeps_the_first_and_names_the_command():
    twins = [replace(run("exp-a", "ce", 0, 0.50), origin="experiments of main"),
             replace(run("exp-b", "ce", 0, 0.99), origin="experiments of main")]
    with pytest.warns(UserWarning, match="exp-a and exp-b have the same parameters and origin "
                      r"\(experiments of main\) but different metrics; using exp-a .*"
                      "`dvc exp diff exp-a exp-b`"):
        kept = report.unique(twins)
    assert [r.rev for r in kept] == ["exp-a"]


def test_runs_in_reads_dvc_exp_show_json():
    node = lambda rev, name, loss: {  # noqa: E731
        "rev": rev, "name": name, "data": {
            "params": {"params.yaml": {"data": {"seed": 0, "teacher": {"loss": loss}}}},
            "metrics": {"reports/metrics.json": {"data": {"student": {"accuracy": 0.5}}}}}}
    shown = [node("workspace", None, "ce"),
             {**node("0" * 40, None, "ce"), "experiments": [
                 {"revs": [node("1" * 40, "exp-a", "mse")]},
                 {"revs": [{"rev": "2" * 40, "name": "failed", "data": {"params": {}, "metrics": {}}}]},
                 # queued or running: DVC shows the queued params with the baseline's metrics
                 {"revs": [node("3" * 40, "exp-running", "mse")], "executor": {"state": "running"}},
                 {"revs": [node("4" * 40, "exp-queued", "ls")], "executor": {"state": "queued"}}]}]
    runs = report.runs_in(shown)
    assert [(r.rev, r.origin, r.params["teacher"]["loss"]) for r in runs] == [
        ("workspace", "workspace", "ce"), ("0000000", "0000000", "ce"),
        ("exp-a", "experiments of 0000000", "mse")]


def test_plot_writes_png_points_and_their_dvc_plots(tmp_path):
    png = report.plot(RUNS, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    points = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert len(points) == len(RUNS)
    assert {p["teacher_loss"] for p in points} == {"ce", "mse"}
    plots = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["plots"]
    assert [next(iter(p)) for p in plots] == ["student_vs_teacher_bcpd_mse", "student_vs_teacher_ece"]
    assert all(d["template"] == "by_teacher_loss" and d["y"] == {"points.csv": "student_accuracy"}
               for p in plots for d in p.values())


def test_gain_against_gap_pairs_each_loss_with_the_ce_teacher_of_its_configuration(tmp_path):
    runs = [*RUNS[:6], run("h", "ls", 0, 0.49, bcpd=0.08), run("i", "ls", 1, 0.50, bcpd=0.08)]
    runs[3:6] = [replace(r, metrics={**r.metrics, "teacher": {**r.metrics["teacher"], "bcpd_mse": 0.03}})
                 for r in runs[3:6]]
    points = {p["loss"]: p for p in report.gain_vs_gap(report.summarise(runs))}
    assert set(points) == {"mse", "ls"}
    assert points["mse"]["gap"] == pytest.approx(0.03 - 0.05) and points["mse"]["gain"] == pytest.approx(0.02)
    assert points["mse"]["low"] < 0.02 < points["mse"]["high"] and points["mse"]["n"] == 3
    assert points["ls"]["gap"] == pytest.approx(0.03) and points["ls"]["gain"] == pytest.approx(-0.015)
    png = report.effect_plot(report.summarise(runs), tmp_path / "gain.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert report.effect_plot(report.summarise(RUNS[:3]), tmp_path / "none.png") is None  # CE runs only
