"""Every distillation method, with a CE and an MSE teacher, through `dvc exp run` on the digits."""

import json

import pytest
import yaml

from bayeskd.distill import all_methods
from conftest import run, tiny_params


@pytest.mark.slow
def test_every_method_with_ce_and_mse_teachers_through_dvc_exp_run(project):
    params = tiny_params(**{"data.name": "digits", "data.augment.padding": 1, "cache.views": 2,
                            "teacher.net": "cnn_teacher", "student.net": "cnn_student",
                            "teacher.optim.epochs": 2, "student.optim.epochs": 2,
                            "student.optim.milestones": [1]})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "digits"], project)
    for loss in ("ce", "mse"):
        for method in all_methods():
            run(["dvc", "exp", "run", "evaluate", "-n", f"{loss}-{method}",
                 "-S", f"teacher.loss={loss}", "-S", f"student.method={method}"], project)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    results = {}
    for exp in shown[0]["experiments"] or []:
        rev = exp["revs"][0]
        data = rev["data"]
        name = rev["name"]
        metrics = data["metrics"]["reports/metrics.json"]["data"]
        assert data["params"]["params.yaml"]["data"]["student"]["method"] == name.split("-", 1)[1]
        results[name] = metrics
    assert set(results) == {f"{loss}-{m}" for loss in ("ce", "mse") for m in all_methods()}
    for name, metrics in results.items():
        assert 0.0 <= metrics["student"]["accuracy"] <= 1.0, name
    # the two teachers differ, and each method's student follows its teacher
    assert results["ce-kd"]["teacher"] != results["mse-kd"]["teacher"]
    assert len({json.dumps(m["student"], sort_keys=True) for m in results.values()}) == len(results)
