import csv
import io
import math

import pytest
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


def test_a_run_listed_twice_counts_once_and_conflicts_warn():
    same = run("workspace", "ce", 0, 0.50)
    assert len(report.unique(RUNS + [same])) == len(RUNS)
    with pytest.warns(UserWarning, match="a and other have the same parameters but different metrics"):
        assert len(report.unique(RUNS + [run("other", "ce", 0, 0.99)])) == len(RUNS)


def test_runs_in_reads_dvc_exp_show_json():
    node = lambda rev, name, loss: {  # noqa: E731
        "rev": rev, "name": name, "data": {
            "params": {"params.yaml": {"data": {"seed": 0, "teacher": {"loss": loss}}}},
            "metrics": {"reports/metrics.json": {"data": {"student": {"accuracy": 0.5}}}}}}
    shown = [node("workspace", None, "ce"),
             {**node("0" * 40, None, "ce"), "experiments": [
                 {"revs": [node("1" * 40, "exp-a", "mse")]},
                 {"revs": [{"rev": "2" * 40, "name": "failed", "data": {"params": {}, "metrics": {}}}]}]}]
    runs = report.runs_in(shown)
    assert [(r.rev, r.params["teacher"]["loss"]) for r in runs] == [
        ("workspace", "ce"), ("0000000", "ce"), ("exp-a", "mse")]


def test_plot_writes_png_and_points(tmp_path):
    png = report.plot(RUNS, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    points = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert len(points) == len(RUNS)
    assert {p["teacher_loss"] for p in points} == {"ce", "mse"}
