import pytest
import yaml

from bayeskd import config, defaults
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

    from bayeskd import distill, methods

    for name in config.METHODS:
        fn = distill.METHODS[name] if name in distill.METHODS else methods.FEATURE[name].__init__
        keyword_only = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert sorted(keyword_only) == sorted(config.hparams(name)), name


def test_the_schema_reads_the_declarations_the_registries_hold():
    """config reads the methods and nets from source (declare.scan); the imported packages register
    the same declarations, in the same order."""
    from bayeskd import methods, zoo

    assert config.METHODS == methods.METHODS and list(config.METHODS) == list(methods.METHODS)
    assert config.NETS == zoo.NETS and list(config.NETS) == list(zoo.NETS)
    assert set(methods.LOGIT) | set(methods.FEATURE) == set(methods.METHODS) and len(methods.FEATURE) == 10
    for name, declared in methods.FEATURE.items():  # the decorator set each class's flags
        assert declared.single_process == methods.METHODS[name].single_process
        assert declared.in_float32 == methods.METHODS[name].in_float32


def test_committed_params_yaml_is_what_bayeskd_params_sync_writes():
    text = (ROOT / "params.yaml").read_text()
    assert defaults.sync(text) == text


def test_params_sync_sets_the_declared_defaults_and_keeps_everything_else(tmp_path, capsys):
    from bayeskd import cli

    text = (ROOT / "params.yaml").read_text()
    kd, at, crd = (defaults.method_line(m) + "\n" for m in ("kd", "at", "crd"))
    assert kd in text and at in text and crd in text
    others = [defaults.method_line(m) + "\n" for m, d in config.METHODS.items() if d.hparams and m != "crd"]
    last = max(others, key=text.index)  # the last method line but crd's
    stale = (text.replace(kd, "  kd:  # block style\n    temperature: 3.0\n    ce_weight: 0.2\n")
             .replace(at, "  at: {weight: 15.0}  # digits\n").replace(crd, ""))
    (tmp_path / "params.yaml").write_text(stale)
    cli.main(["--repo", str(tmp_path), "params"])  # prints, writes nothing
    assert yaml.safe_load(capsys.readouterr().out)["student"]["crd"] == config.hparams("crd")
    assert (tmp_path / "params.yaml").read_text() == stale
    cli.main(["--repo", str(tmp_path), "params", "--sync"])
    assert "now hold what the declarations give" in capsys.readouterr().out
    # rewritten in place (a comment kept), the missing one added after the last
    expected = text.replace(at, at[:-1] + "  # digits\n").replace(crd, "").replace(last, last + crd)
    assert (tmp_path / "params.yaml").read_text() == expected
    cli.main(["--repo", str(tmp_path), "params", "--sync"])
    assert "every section holds what the declarations give" in capsys.readouterr().out


def test_params_sync_adds_a_missing_dataset_section_with_its_declared_defaults():
    from bayeskd import declare
    from bayeskd.datasets import DATASETS

    class Toy(config.Section):
        test_fraction: float = 0.3
        center: bool = False

    toy = declare.dataset("toy", section=Toy, classes=3, images=False)
    text = (ROOT / "params.yaml").read_text()
    synced = defaults.sync(text, DATASETS | {"toy": toy})
    assert synced == text.replace("\n  augment:", "\n  toy: {test_fraction: 0.3, center: false}\n  augment:")
    chosen = synced.replace("test_fraction: 0.3", "test_fraction: 0.2")
    assert defaults.sync(chosen, DATASETS | {"toy": toy}) == chosen  # a section that is there is the user's


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


def test_a_batch_smaller_than_the_processes_is_refused():
    """Each training process takes its part of every batch: with fewer samples than processes a
    part would be empty (bayeskd.train.epoch_steps)."""
    msg = error_for(lambda r: (r["compute"].update(processes=4), r["student"]["optim"].update(batch_size=3)))
    assert msg == ("params.yaml: student.optim.batch_size = 3 is smaller than compute.processes = 4: each "
                   "process trains on its part of every batch; use a batch of at least 4, or fewer processes")
    r = raw()
    r["compute"]["processes"] = 4
    r["teacher"]["optim"]["batch_size"] = r["student"]["optim"]["batch_size"] = 4
    assert config.parse(r).compute.processes == 4


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


BOUNDS = {
    # mutation of params.yaml: the text its error holds (the key, the value, the range and the reason)
    "runaway epochs": (lambda r: r["teacher"]["optim"].update(epochs=10**12),
                       "teacher.optim.epochs = 1000000000000: must be between 1 and 10,000: more is taken "
                       "for a typo (the CIFAR recipe trains 240 epochs)"),
    "runaway batch": (lambda r: r["student"]["optim"].update(batch_size=640_000),
                      "student.optim.batch_size = 640000: must be between 1 and 65,536"),
    "runaway export batch": (lambda r: r["export"].update(batch_size=10**9),
                             "export.batch_size = 1000000000"),
    "runaway samples": (lambda r: r["data"]["gaussian"].update(n_samples=10**10),
                        "data.gaussian.n_samples = 10000000000: must be between 1 and 10,000,000"),
    "too few samples": (lambda r: r["data"]["gaussian"].update(n_samples=10),
                        "data.gaussian: n_samples = 10 gives 0 training, 0 validation, 10 test samples; each "
                        "split needs at least n_classes = 10"),
    "runaway images": (lambda r: r["data"]["gaussian_images"].update(n_train=50_000_000),
                       "data.gaussian_images.n_train = 50000000: must be between 1 and 1,000,000"),
    "too few images": (lambda r: r["data"]["gaussian_images"].update(n_val=5),
                       "n_val = 5: a split needs at least n_classes = 10 images"),
    "tiny shards": (lambda r: r["cache"].update(shard_size=5), "cache.shard_size = 5: must be between 100 "
                    "and 1,000,000: a shard is computed in memory, and fewer than 100 samples"),
    "milestone at the last epoch": (lambda r: r["teacher"]["optim"].update(epochs=10, milestones=[7, 10]),
                                    "teacher.optim: milestones = [7, 10]: 10 not within the 10 epochs; a "
                                    "milestone lies in 1..9"),
    "milestone past the last epoch": (lambda r: r["student"]["optim"].update(milestones=[150, 180, 210]),
                                      "student.optim: milestones = [150, 180, 210]: 150, 180, 210 not"),
}


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_bounds_catch_typos_and_say_why(case):
    mutate, expected = BOUNDS[case]
    assert expected in error_for(mutate)


def test_the_paper_recipe_is_within_the_bounds():
    r = raw()
    for role in ("teacher", "student"):
        r[role]["optim"].update(epochs=240, milestones=[150, 180, 210], batch_size=64)
    r["data"]["gaussian_images"].update(n_train=50_000, n_val=0, n_test=10_000)
    r["cache"]["shard_size"] = 5000
    p = config.parse(r)
    assert p.teacher.optim.epochs == 240 and p.data.gaussian_images.n_val == 0
    for name in config.presets_in(ROOT / "presets.yaml"):  # every preset too
        config.parse(config.with_overrides(raw(), config.preset(name, ROOT / "presets.yaml")))


@pytest.mark.parametrize("text,expected", [
    (b"seed: 0\nseed: 1\n", "params.yaml: not valid YAML: duplicate key 'seed' at line 2, column 1"),
    (b"seed: 0\n# caf\xe9\n", "params.yaml: not UTF-8 text (byte 0xe9 at offset 13)"),
    (b"seed: [0\n", "params.yaml: not valid YAML: expected ',' or ']'"),
])
def test_params_yaml_that_is_no_clean_yaml_is_refused_by_check_params(tmp_path, text, expected):
    """The stage itself, on a params.yaml with a duplicated key (plain YAML keeps the last one), a
    non-UTF-8 byte or broken YAML: one error line, the file named, exit code 2, nothing written."""
    (tmp_path / "params.yaml").write_bytes(text)
    result = run(["python", str(ROOT / "stages/check_params.py")], tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: invalid parameters"]
    assert expected in result.stderr
    assert not (tmp_path / "reports").exists()


def test_a_yaml_merge_may_override_keys():
    text = "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n"
    assert config.parse_yaml(text, "t.yaml") == {"base": {"x": 1, "y": 2}, "derived": {"x": 1, "y": 3}}


@pytest.mark.parametrize("text,expected", [
    (b"recipe: [1\n", "presets.yaml: not valid YAML"),
    (b"recipe: {}\n\xff\n", "presets.yaml: not UTF-8 text (byte 0xff"),
    (b"- resnet\n- vgg\n", "presets.yaml: expected a mapping of sections (recipe, pairs, synthetic), "
                          "found a list"),
    (b"recipe: {}\npairs: [a, b]\n", "presets.yaml: expected `recipe` (key: value settings), `pairs`"),
])
@pytest.mark.parametrize("args", [["preset", "--list"], ["preset", "resnet32x4-resnet8x4"]])
def test_a_damaged_presets_yaml_is_one_error_line(tmp_path, capsys, text, expected, args):
    from bayeskd import cli

    (tmp_path / "presets.yaml").write_bytes(text)
    with pytest.raises(SystemExit) as e:
        cli.main(["--repo", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1 and expected in err, err
