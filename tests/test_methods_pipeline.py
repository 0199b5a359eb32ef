"""Every distillation method, with a CE and an MSE teacher, through `dvc exp run` on the digits."""

import json
import math

import pytest
import yaml

from bayeskd.config import METHODS
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
        for method in METHODS:
            run(["dvc", "exp", "run", "distill", "-n", f"{loss}-{method}",
                 "-S", f"teacher.loss={loss}", "-S", f"student.method={method}"], project)

    baseline = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)[1]
    results = {}
    for exp in baseline["experiments"]:
        rev = exp["revs"][0]
        loss, method = rev["name"].split("-", 1)
        params = rev["data"]["params"]["params.yaml"]["data"]
        assert (params["teacher"]["loss"], params["student"]["method"]) == (loss, method)
        summary = run(["git", "show", f"{rev['rev']}:dvclive/student/metrics.json"], project).stdout
        results[rev["name"]] = json.loads(summary)
    assert set(results) == {f"{loss}-{m}" for loss in ("ce", "mse") for m in METHODS}
    for name, metrics in results.items():
        assert 0.0 <= metrics["val"]["acc"] <= 1.0 and math.isfinite(metrics["train"]["loss"]), name
    # labels alone do not see the teacher; every other run trained a student of its own
    assert results["ce-none"] == results["mse-none"]
    distinct = {json.dumps(m, sort_keys=True) for name, m in results.items() if name != "mse-none"}
    assert len(distinct) == len(results) - 1
