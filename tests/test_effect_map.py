"""The effect map's study script (studies/effect_map.py): every run it can queue has valid
parameters, and its committed archive holds the runs its protocol asks for."""

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


def test_the_archive_holds_every_run_of_the_protocol_and_nothing_else():
    """reports/effect_map/runs.csv, completed with the parameters it leaves out, writes back to the
    same bytes, and holds exactly the runs the protocol asks for: the selection, seeds 0 to 2 of
    every cell at the chosen rates, seeds 3 and 4 where a paired difference was within two standard
    deviations after three seeds."""
    from bayeskd import report

    studies, path = effect_map.STUDIES, ROOT / effect_map.ARCHIVE
    runs = effect_map.archived(studies)
    assert report.runs_csv(report.unique(runs)) == path.read_text()
    rates = effect_map.chosen_rates(runs, studies)  # the ones docs/effect-map.md states
    assert rates == {("gaussian", "ce"): 0.03, ("gaussian", "mse"): 0.03, ("gaussian", "ce_ts"): 0.03,
                     ("images", "ce"): 0.1, ("images", "mse"): 0.01, ("images", "ce_ts"): 0.1}
    first = [r for r in runs if r.params["seed"] in effect_map.SEEDS]  # what the more phase saw
    asked = {w for phase in ("select", "main", "more") for w in effect_map.wanted(phase, first, studies)}
    assert all(effect_map.done(runs, *w, studies) for w in asked)
    assert len(runs) == len(asked)  # and nothing else
