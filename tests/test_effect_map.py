"""The effect map's study script (studies/effect_map.py): every run it can queue has valid parameters."""

import importlib.util
import sys

import pytest
import yaml

from bayeskd import config
from conftest import ROOT

spec = importlib.util.spec_from_file_location("effect_map", ROOT / "studies/effect_map.py")
effect_map = sys.modules["effect_map"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(effect_map)


@pytest.mark.parametrize("studies", ["STUDIES", "GPU_STUDIES"])
def test_every_run_of_the_study_has_valid_parameters(studies):
    studies = getattr(effect_map, studies)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for cell in effect_map.cells(studies):
        for loss in effect_map.LOSSES:
            for lr in effect_map.LRS:
                overrides = cell.overrides(studies) | {"teacher.loss": loss, "teacher.optim.lr": lr}
                p = config.parse(config.with_overrides(params, overrides))
                assert p.student.temperature() == cell.temperature
                assert p.data.no_validation_split() is None  # the rate is chosen on it, ce_ts fits T on it


def test_budgets_vary_the_epochs_only():
    _, budgets = effect_map.STUDIES["gaussian"]
    converged, overfit = budgets["converged"], budgets["overfit"]
    assert set(converged) == set(overfit) == {"teacher.optim.epochs", "teacher.optim.milestones"}
    assert overfit["teacher.optim.epochs"] == 2 * converged["teacher.optim.epochs"]
    assert [m / e for b in budgets.values() for m, e in [(b["teacher.optim.milestones"][0],
                                                          b["teacher.optim.epochs"])]] == [0.75, 0.75]


def test_archive_of_the_main_phase_keeps_its_seeds_only(tmp_path):
    from bayeskd import report

    archive = tmp_path / "runs.csv"
    archive.write_text("rev,origin,params.seed,params.teacher.loss,metrics.student.accuracy\n"
                       "a,o,0,ce,0.5\nb,o,3,ce,0.6\nc,o,2,mse,0.7\nd,o,4,mse,0.8\n")
    effect_map.keep_seeds(str(archive), effect_map.SEEDS)
    runs = report.read_runs(archive)
    assert [(r.rev, r.params["seed"]) for r in runs] == [("a", 0), ("c", 2)]
