import pytest
import yaml

from bayeskd import config
from conftest import ROOT, run


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_are_valid():
    p = config.load(ROOT / "params.yaml")
    assert p.teacher.loss in ("ce", "mse", "ls")
    assert p.data.name == "gaussian"


def error_for(mutate) -> str:
    r = raw()
    mutate(r)
    with pytest.raises(config.ParamsError) as e:
        config.parse(r)
    return str(e.value)


def test_value_outside_its_set_names_key_value_and_choices():
    msg = error_for(lambda r: r["teacher"].update(loss="hinge"))
    assert "teacher.loss" in msg and "'hinge'" in msg
    assert "'ce'" in msg and "'mse'" in msg and "'ls'" in msg


def test_unknown_key_names_key_and_allowed_keys():
    msg = error_for(lambda r: r["student"].update(tmperature=3.0))
    assert "student.tmperature" in msg and "unknown key" in msg
    assert "method" in msg.split("allowed here:")[1]


def test_method_hyperparameters_are_checked_against_the_method():
    msg = error_for(lambda r: r["student"]["dkd"].update(gama=3))
    assert "student.dkd.gama = 3: unknown key" in msg and "beta" in msg.split("allowed here:")[1]
    assert "valid number" in error_for(lambda r: r["student"]["dkd"].update(beta="6"))
    assert "valid integer" in error_for(lambda r: r["student"]["crd"].update(nce_k=4096.5))
    assert "student.dkd.beta = -1" in error_for(lambda r: r["student"]["dkd"].update(beta=-1))
    assert config.parse(raw() | {"student": raw()["student"] | {"dkd": {"beta": 6}}}).student.dkd.beta == 6
    msg = error_for(lambda r: r["student"].update(method="crd2"))
    assert "student.method = 'crd2'" in msg and "'dkd'" in msg and "'reviewkd'" in msg


def test_params_yaml_lists_every_method_with_the_schema_defaults():
    student = raw()["student"]
    for method in config.METHODS:
        assert student.get(method, {}) == config.hparams(method), method


def test_every_method_takes_exactly_its_schema_hyperparameters():
    import inspect

    from bayeskd import distill, feature

    for name in config.METHODS:
        fn = distill.METHODS[name] if name in distill.METHODS else feature.METHODS[name].__init__
        keyword_only = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert sorted(keyword_only) == sorted(config.hparams(name)), name


def test_validating_params_imports_no_torch():
    code = "import sys, bayeskd.config as c; c.load(); assert 'torch' not in sys.modules, sorted(sys.modules)"
    run(["python", "-c", code], ROOT)


def test_non_finite_numbers_are_refused():
    msg = error_for(lambda r: r["teacher"]["optim"].update(lr=float("inf")))
    assert "teacher.optim.lr = inf" in msg and "finite" in msg


def test_wrong_type_names_key_and_value():
    msg = error_for(lambda r: r["teacher"]["optim"].update(epochs="ten"))
    assert "teacher.optim.epochs = 'ten'" in msg and "integer" in msg


def test_unknown_net_lists_registered_nets():
    msg = error_for(lambda r: r["student"].update(net="resnet9000"))
    assert "student.net = 'resnet9000'" in msg and "mlp_student" in msg


def test_cross_field_check():
    msg = error_for(lambda r: r["data"]["gaussian"].update(train_fraction=0.6, val_fraction=0.5))
    assert "data.gaussian" in msg and "test split" in msg


def test_temperature_scaling_is_refused_without_a_validation_split():
    def images_without_val(r):
        r["teacher"]["loss"] = "ce_ts"
        r["data"]["name"] = "gaussian_images"
        r["data"]["gaussian_images"]["n_val"] = 0

    msg = error_for(images_without_val)
    assert msg == ("params.yaml: teacher.loss = 'ce_ts' fits its temperature on the validation split, and "
                   "data.gaussian_images.n_val = 0 leaves data.name = 'gaussian_images' without one; hold "
                   "one out, or use teacher.loss ce, mse or ls")
    assert "data.images.val_fraction = 0.0" in error_for(
        lambda r: (r["teacher"].update(loss="ce_ts"), r["data"].update(name="cifar100")))
    r = raw()
    r["teacher"]["loss"] = "ce_ts"
    assert config.parse(r).teacher.loss == "ce_ts"  # gaussian always holds a validation split out


def test_the_distillation_temperature_of_each_method():
    student = config.parse(raw()).student
    temperature = {m: student.model_copy(update={"method": m}).temperature() for m in config.METHODS}
    assert temperature["kd"] == student.kd.temperature and temperature["dist"] == student.dist.tau
    assert temperature["dkd"] == student.dkd.temperature
    assert {m for m, t in temperature.items() if t is None} == set(config.METHODS) - {"kd", "dkd", "dist"}


def test_missing_key():
    msg = error_for(lambda r: r["export"].pop("opset"))
    assert "export.opset: missing" in msg


def test_bad_params_stop_a_stage_before_it_writes(project):
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["teacher"]["loss"] = "hinge"
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    before = sorted(x.relative_to(project) for x in project.rglob("*") if ".git" not in x.parts)
    result = run(["python", "stages/prepare.py"], project, check=False)
    assert result.returncode == 2
    assert "teacher.loss = 'hinge'" in result.stderr and "'mse'" in result.stderr
    assert "Traceback" not in result.stderr
    after = sorted(x.relative_to(project) for x in project.rglob("*") if ".git" not in x.parts)
    assert after == before
