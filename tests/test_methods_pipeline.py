"""Every distillation method end to end on the digits: each through `bayeskd.distill.distiller` and
the training loop, as the distill stage runs it; and a logit method, a feature method and a
single-process feature method through `dvc exp run`, the last also with an MSE teacher."""

import json
import math

import pytest
import torch
import yaml

from bayeskd import data, distill, nets
from bayeskd.cache import LogitCache, build
from bayeskd.config import METHODS, load
from bayeskd.losses import TEACHER_LOSSES
from bayeskd.train import Checkpoint, TrainSet, fit, seed_everything
from conftest import ROOT, run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits, and a CE and an MSE teacher trained on them for 3 epochs, with their logit caches."""
    work = tmp_path_factory.mktemp("methods")
    cfg = load(ROOT / "params.yaml").data.model_copy(update={"name": "digits"})
    ds = data.make(cfg)
    x, y = (torch.from_numpy(a) for a in (ds.splits["train"].x, ds.splits["train"].y))
    optim = load(ROOT / "params.yaml").teacher.optim.model_copy(update={"epochs": 3, "milestones": [],
                                                                        "lr": 0.05})
    teachers = {}
    for loss in ("ce", "mse"):
        seed_everything(0)
        teacher = nets.build("cnn_teacher", 10, (1, 8, 8))
        fit(teacher, lambda z, b, e, name=loss: {name: TEACHER_LOSSES[name](z, b.y)}, TrainSet(x, y), optim,
            seed=0, checkpoint=Checkpoint(work / f"{loss}.pt", loss))
        build(teacher, x, y, work / loss, num_classes=10, augment=None, views="all", seed=0, dtype="float16",
              shard_size=len(y), topk=0, teacher_sha256=loss, log=lambda _: None)
        teachers[loss] = (teacher, LogitCache(work / loss, num_samples=len(y), num_classes=10))
    return x, y, teachers, optim, work


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_distills_from_a_ce_and_an_mse_teacher(digits, method):
    x, y, teachers, optim, work = digits
    results = {}
    for loss, (teacher, cache) in teachers.items():
        seed_everything(0)
        student = nets.build("cnn_student", 10, (1, 8, 8))
        d = distill.distiller(method, student, cache=cache, teacher=teacher, in_shape=(1, 8, 8),
                              num_samples=len(y))
        history = fit(student, d.loss_fn, TrainSet(x, y, None, d.view_table),
                      optim.model_copy(update={"epochs": 2}), seed=0, extra=d.extra,
                      checkpoint=Checkpoint(work / f"{method}-{loss}.pt", f"{method}-{loss}"))
        assert all(math.isfinite(v) for v in history[-1].values()), history[-1]
        first, last = history[0], history[-1]  # it learns: the total falls, or (a warm-up raising it) the CE
        assert last["train/loss"] < first["train/loss"] or last["train/ce"] < first["train/ce"]
        results[loss] = torch.cat([p.flatten() for p in student.parameters()])
    # labels alone do not see the teacher; every other method's student depends on it
    assert torch.equal(results["ce"], results["mse"]) == (method == "none")


def test_methods_run_through_dvc_exp_run_with_ce_and_mse_teachers(project):
    """A logit method from the cache, a feature method and a single-process feature method with a CE
    teacher, and the last with an MSE teacher too (a feature method reads the teacher itself, not the
    cache; every method with both teachers runs in process above, and KD from an MSE teacher through
    DVC in tests/test_compare.py): four experiments of one project. Back to a variant that ran
    before, DVC restores its teacher and student from its run cache instead of training them again."""
    import dvc.api as dvc_api  # only here: the other tests of this module need no DVC in-process

    variants = [("ce", "kd"), ("ce", "reviewkd"), ("ce", "crd"), ("mse", "crd")]
    params = tiny_params(**{"data.name": "digits", "data.augment.padding": 1, "cache.views": 2,
                            "teacher.net": "cnn_teacher", "student.net": "cnn_student",
                            "teacher.optim.epochs": 2, "student.optim.epochs": 2,
                            "teacher.optim.milestones": [1], "student.optim.milestones": [1],
                            "student.crd.nce_k": 256,  # of 1,077 samples; the default would be all
                            # softmax-MSE learns slowly: after 2 epochs its teacher is barely above
                            # chance (0.13 on its views on one CPU, above 0.2 on another)
                            "cache.min_accuracy": 0.05})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "digits"], project)
    for loss, method in variants:
        run(["dvc", "exp", "run", "distill", "-n", f"{loss}-{method}", "-S", f"teacher.loss={loss}",
             "-S", f"student.method={method}"], project)
    baseline = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)[1]
    results = {}
    for exp in baseline["experiments"]:
        rev = exp["revs"][0]
        params = rev["data"]["params"]["params.yaml"]["data"]
        assert f"{params['teacher']['loss']}-{params['student']['method']}" == rev["name"]
        # the training summary (a DVC metric in git), read at the experiment's commit
        summary = dvc_api.read("dvclive/student/metrics.json", repo=str(project), rev=rev["rev"])
        results[rev["name"]] = json.loads(summary)
    assert set(results) == {f"{loss}-{m}" for loss, m in variants}
    assert all(0.0 <= m["val"]["acc"] <= 1.0 and math.isfinite(m["train"]["loss"]) for m in results.values())
    assert len({json.dumps(m, sort_keys=True) for m in results.values()}) == len(results)  # all distinct

    again = run(["dvc", "exp", "run", "distill", "-S", "teacher.loss=ce", "-S", "student.method=kd"], project)
    log = again.stdout + again.stderr
    assert "Stage 'train_teacher' is cached - skipping run" in log, log
    assert "Stage 'distill' is cached - skipping run" in log, log
    summary = json.loads((project / "dvclive/student/metrics.json").read_text())
    assert summary == results["ce-kd"]
