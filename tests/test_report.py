import csv
import io
import math
import re
import shlex
from dataclasses import replace

import pytest
import yaml
from scipy.stats import t

from bayeskd import report
from conftest import ROOT


def run(rev, loss, seed, student, teacher_ece=0.1, bcpd=0.05, method="kd"):
    params = {"seed": seed, "data": {"name": "gaussian"},
              "teacher": {"net": "mlp_teacher", "loss": loss},
              "student": {"net": "mlp_student", "method": method}, "export": {"opset": 18}}
    metrics = {"teacher": {"accuracy": 0.5, "ece": teacher_ece, "bcpd_mse": bcpd},
               "student": {"accuracy": student}}
    return report.Run(rev, params, metrics)


KD, NONE = (f"gaussian: mlp_teacher -> mlp_student ({m})" for m in ("kd", "none"))
RUNS = [
    run("a", "ce", 0, 0.50), run("b", "ce", 1, 0.52), run("c", "ce", 2, 0.51),
    run("d", "mse", 0, 0.51), run("e", "mse", 1, 0.55), run("f", "mse", 2, 0.53),
    run("g", "mse", 0, 0.60, method="none"),
]


def test_paired_difference_and_t_interval():
    rows = report.summarise(RUNS)
    assert [(r.config, r.loss, r.seeds) for r in rows] == [
        (KD, "ce", [0, 1, 2]), (KD, "mse", [0, 1, 2]), (NONE, "mse", [0])]
    ce, mse, single = rows
    assert mse.diff == pytest.approx([0.01, 0.03, 0.02])
    lo, hi = report.t_interval(mse.diff)
    half = t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # mean 0.02, sd 0.01
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert ce.diff == [] and single.diff == []  # no CE run to pair with: shown, without interval
    assert report.t_interval([0.1]) is None


def test_formats_carry_the_same_numbers():
    rows = report.summarise(RUNS)
    half = t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    for wide in (False, True):
        md, table = report.to_markdown(rows, wide), report.to_table(rows, wide)
        for text in (md, table):
            assert "0.5300 ± 0.0200" in text
            interval = f"+0.0200 [{0.02 - half:+.4f}, {0.02 + half:+.4f}] (n=3)"
            assert (interval if wide else f"+0.0200±{half:.4f}") in text
            assert "1 paired comparison with an interval" in " ".join(text.split())
        assert md.count("\n") == 2 + len(rows) + 2  # header, rule, rows, a blank line and the legend
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(rows))))
    assert parsed[1]["teacher_loss"] == "mse" and float(parsed[1]["diff_vs_ce_mean"]) == pytest.approx(0.02)
    assert parsed[2]["student_accuracy_sd"] == "" and parsed[2]["diff_vs_ce_n"] == ""


def test_a_run_listed_twice_counts_once_under_its_commit_name():
    head = [replace(r, origin="main") for r in RUNS]
    workspace = replace(run("workspace", "ce", 0, 0.50), origin="workspace")  # holds commit a
    kept = report.unique([workspace, *head])
    assert sorted(r.rev for r in kept) == sorted(r.rev for r in RUNS) and {r.source for r in kept} == {""}




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


def sweep_run(loss, lr, seed, val_nll, student, temperature=4.0):
    """A run of the effect map's shape: the teacher's learning rate varies, with its validation NLL."""
    r = run(f"{loss}-{lr}-{seed}-{temperature}", loss, seed, student)
    r.params["teacher"]["optim"] = {"lr": lr}
    r.params["student"]["kd"] = {"temperature": temperature}
    r.metrics["teacher"] |= {"val_nll": val_nll, "transfer_bcpd_mse_at_t": 0.01 + 0.001 * (loss == "mse")}
    r.metrics["student"] |= {"bcpd_mse": 0.03 + 0.001 * seed, "ece": 0.05 - 0.002 * (loss == "mse")}
    return replace(r, origin="experiments of main")


SWEEP = [
    # CE: 0.1 is best on seed 0's validation NLL; MSE: 0.03; only the chosen rates have seeds 1, 2
    sweep_run("ce", 0.03, 0, 1.30, 0.50), sweep_run("ce", 0.1, 0, 1.20, 0.51),
    sweep_run("ce", 0.1, 1, 1.21, 0.52), sweep_run("ce", 0.1, 2, 1.22, 0.50),
    sweep_run("mse", 0.03, 0, 1.10, 0.52), sweep_run("mse", 0.1, 0, 1.15, 0.60),
    sweep_run("mse", 0.03, 1, 1.11, 0.55), sweep_run("mse", 0.03, 2, 1.12, 0.53),
    # another configuration (T = 1) with the chosen rates only
    *(sweep_run(loss, lr, s, 1.0, 0.5 + 0.01 * s + 0.005 * (loss == "mse"), temperature=1.0)
      for loss, lr in (("ce", 0.1), ("mse", 0.03)) for s in (0, 1, 2)),
]


def test_select_chooses_the_rate_per_loss_and_pairs_across_rates():
    select = report.Selection.parse("teacher.optim.lr:teacher.val_nll")
    rows = report.summarise(SWEEP, select)
    by = {(r.config.rsplit("=", 1)[-1], r.loss): r for r in rows}
    assert set(by) == {("4.0", "ce"), ("4.0", "mse"), ("1.0", "ce"), ("1.0", "mse")}
    assert (by["4.0", "ce"].selected, by["4.0", "mse"].selected) == (0.1, 0.03)
    assert by["4.0", "mse"].seeds == [0, 1, 2]
    assert by["4.0", "mse"].diffs["student.accuracy"] == pytest.approx([0.01, 0.03, 0.03])
    assert by["4.0", "mse"].diffs["student.ece"] == pytest.approx([-0.002] * 3)
    assert by["4.0", "mse"].diffs["teacher.transfer_bcpd_mse_at_t"] == pytest.approx([0.001] * 3)
    # without the selection each rate is a configuration of its own: MSE's seeds at 0.03 pair only
    # with CE's one run at 0.03, its run at 0.1 with CE's seed 0 at 0.1
    plain = [r for r in report.summarise(SWEEP) if r.loss == "mse" and "4.0" in r.config]
    assert sorted(d for r in plain for d in r.diff) == pytest.approx([0.02, 0.09])
    assert sorted(len(r.diff) for r in plain) == [1, 1]
    with pytest.raises(report.ReportError, match="PARAM:METRIC"):
        report.Selection.parse("teacher.optim.lr")


def test_holm_correction_and_p_values():
    from scipy.stats import ttest_1samp

    values = [0.01, 0.03, 0.02, 0.025]
    assert report.p_value(values) == pytest.approx(ttest_1samp(values, 0).pvalue)
    assert report.p_value([0.01, 0.01]) == 0.0 and report.p_value([0.0, 0.0]) == 1.0
    # sorted p .001 .01 .03 .04 against .05/4, .05/3, .05/2, .05/1: the first two are kept, then
    # .03 > .025 stops the procedure, so .04 < .05 is not kept either
    assert report.holm([0.04, 0.001, 0.03, 0.01]) == [False, True, False, True]
    rows = report.summarise(SWEEP, report.Selection("teacher.optim.lr", "teacher.val_nll"))
    assert report.comparisons(rows) == 8  # two configurations x four paired metrics, each n = 3
    family = [(r, k) for r in rows for k in r.holm]
    kept = report.holm([report.p_value(r.diffs[k]) for r, k in family])
    assert [r.holm[k] for r, k in family] == kept and any(kept) and not all(kept)
    marked = report.to_markdown(rows, wide=True)
    assert marked.count("]* (n=3)") == sum(kept) and "8 paired comparisons" in marked


def test_narrow_table_fits_120_columns_and_wide_has_every_column():
    select = report.Selection("teacher.optim.lr", "teacher.val_nll")
    rows = report.summarise(SWEEP, select)
    narrow, wide = report.to_table(rows), report.to_table(rows, wide=True)
    assert max(map(len, narrow.splitlines())) <= 120 < max(map(len, wide.splitlines()))
    assert "teacher val NLL" in wide and "student ECE vs ce" in wide and "selected" in wide


def test_the_archive_of_runs_recomputes_every_cell(tmp_path):
    archive = tmp_path / "runs.csv"
    archive.write_text(report.runs_csv(SWEEP))
    back = report.read_runs(archive)
    assert [(r.rev, r.origin) for r in back] == [(r.rev, r.origin) for r in SWEEP]
    assert back[0].params["teacher"]["optim"]["lr"] == 0.03 and back[0].params["data"]["name"] == "gaussian"
    assert back[0].metrics == SWEEP[0].metrics
    select = report.Selection("teacher.optim.lr", "teacher.val_nll")
    for fmt in report.FORMATS.values():
        assert fmt(report.summarise(back, select), True) == fmt(report.summarise(SWEEP, select), True)
    header = archive.read_text().splitlines()[0].split(",")
    assert "params.export.opset" not in header  # the same in every run: not a varied parameter
    assert {"params.seed", "params.teacher.loss", "params.teacher.optim.lr", "metrics.student.ece"} <= {
        *header}


@pytest.mark.parametrize("text", ["", "a,b\n1,2\n", "rev,origin,params.seed,params.teacher.loss,metrics.x\n"
                                  "r,o,0,ce,not-a-number\n"])
def test_a_damaged_archive_is_one_error_line(tmp_path, capsys, text):
    from bayeskd import cli

    archive = tmp_path / "runs.csv"
    archive.write_text(text)
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", "--runs", str(archive)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {archive}")
    with pytest.raises(SystemExit):
        cli.main(["compare", "--runs", str(tmp_path / "missing.csv")])
    assert "error: cannot read or write" in capsys.readouterr().err


@pytest.mark.parametrize("page", ["README.md", "docs/effect-map.md"])
def test_the_result_tables_are_recomputed_from_the_archived_runs(page, monkeypatch, capsys):
    """Every result table of the README and the effect map is the output of the `bayeskd compare
    --runs ...` command written above it, run on a CSV archive of runs in reports/: each of its
    numbers recomputed from the runs' own metrics."""
    from bayeskd import cli

    doc = (ROOT / page).read_text()
    tables = re.findall(r"<!-- recomputed by tests/test_report.py: (bayeskd compare --runs [^>]*) -->\n"
                        r"(.*?)<!-- end of table -->", doc, re.S)
    assert tables
    monkeypatch.chdir(ROOT)
    for command, table in tables:
        cli.main(shlex.split(command)[1:])
        assert capsys.readouterr().out.strip() == table.strip()
