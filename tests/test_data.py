import json

import numpy as np
import pytest

from bayeskd import config, data
from bayeskd.datasets.digits import make_digits
from bayeskd.datasets.gaussian import gaussian_bcpd, make_gaussian
from bayeskd.validation import DataValidationError, validate
from conftest import ROOT


@pytest.fixture(scope="module")
def params():
    return config.load(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def small_gaussian(params):
    cfg = params.data.gaussian.model_copy(update={"n_samples": 4000})
    return make_gaussian(cfg, seed=3)


def test_gaussian_bcpd_is_bayes_rule(small_gaussian):
    ds = small_gaussian
    assert {k: len(s.y) for k, s in ds.splits.items()} == {"train": 200, "val": 200, "test": 3600}
    for s in ds.splits.values():
        np.testing.assert_allclose(s.p.sum(1), 1, atol=1e-12)
    s = ds.splits["test"]
    means = np.stack([s.x[s.y == k].mean(0) for k in range(10)])  # ~360 samples each: sd 0.13
    assert np.abs(means).max() < 1.6  # class means lie in {-1, 0, 1}^30
    assert abs(ds.info["bayes_accuracy"] - (s.p.argmax(1) == s.y).mean()) < 1e-12
    assert 0.3 < ds.info["bayes_accuracy"] < 0.9


def test_gaussian_bcpd_formula():
    means = np.array([[0.0, 0.0], [1.0, 0.0]])
    x = np.array([[0.5, 3.0], [2.0, 0.0]])
    p = gaussian_bcpd(x, means, noise_var=2.0)
    assert p[0] == pytest.approx([0.5, 0.5])  # equidistant from both means
    # log-odds of class 1 at x=(2, 0): (||x - mu_0||^2 - ||x - mu_1||^2) / (2 var) = (4 - 1) / 4
    assert np.log(p[1, 1] / p[1, 0]) == pytest.approx(0.75)


def test_gaussian_is_deterministic_in_its_seed(params):
    cfg = params.data.gaussian.model_copy(update={"n_samples": 500})
    a, b, c = (make_gaussian(cfg, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.splits["train"].x, b.splits["train"].x)
    assert not np.array_equal(a.splits["train"].x, c.splits["train"].x)


def test_digits_stratified_split(params):
    ds = make_digits(params.data.digits, seed=0)
    sizes = {k: len(s.y) for k, s in ds.splits.items()}
    assert sum(sizes.values()) == 1797 and ds.in_shape == (1, 8, 8)
    for s in ds.splits.values():
        assert s.x.shape[1:] == (1, 8, 8) and s.x.min() >= 0 and s.x.max() <= 1
        counts = np.bincount(s.y, minlength=10) / len(s.y)
        assert np.abs(counts - 0.1).max() < 0.02  # stratified
    again = make_digits(params.data.digits, seed=0)
    np.testing.assert_array_equal(ds.splits["test"].y, again.splits["test"].y)


def test_save_load_roundtrip(small_gaussian, tmp_path):
    data.save(small_gaussian, tmp_path)
    back = data.load(tmp_path)
    assert back.in_shape == small_gaussian.in_shape and back.info == small_gaussian.info
    for k, s in small_gaussian.splits.items():
        np.testing.assert_array_equal(back.splits[k].x, s.x)
        np.testing.assert_array_equal(back.splits[k].p, s.p)


def test_validation_passes_good_data(small_gaussian, tmp_path):
    validate(small_gaussian, tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["success"] and [r["suite"] for r in report["suites"]] == [
        "train", "val", "test", "splits_disjoint"]
    assert all(e["success"] for r in report["suites"] for e in r["expectations"])


def corrupt(ds, split, **arrays):
    splits = dict(ds.splits)
    s = splits[split]
    splits[split] = data.Split(arrays.get("x", s.x), arrays.get("y", s.y), arrays.get("p", s.p))
    return data.Dataset(ds.name, ds.num_classes, ds.in_shape, splits, ds.value_range, ds.info)


def bad_cases(ds):
    tr, va = ds.splits["train"], ds.splits["val"]
    x_nan = tr.x.copy()
    x_nan[3, 2] = np.nan
    x_far = tr.x.copy()
    x_far[0, 0] = 1e3
    y_missing = tr.y.copy()
    y_missing[y_missing == 4] = 5
    y_range = tr.y.copy()
    y_range[0] = 10
    p_bad = tr.p.copy()
    p_bad[0] *= 2
    x_leak = va.x.copy()
    x_leak[0] = tr.x[0]
    return {
        "x_finite": corrupt(ds, "train", x=x_nan),
        "x_max": corrupt(ds, "train", x=x_far),
        "expect_column_distinct_values_to_equal_set": corrupt(ds, "train", y=y_missing),
        "expect_column_values_to_be_between(label)": corrupt(ds, "train", y=y_range),
        "p_sum": corrupt(ds, "train", p=p_bad),
        "splits_disjoint": corrupt(ds, "val", x=x_leak),
    }


@pytest.mark.parametrize("what", list(bad_cases(make_gaussian(
    config.load(ROOT / "params.yaml").data.gaussian.model_copy(update={"n_samples": 400}), 0))))
def test_validation_failure_is_summarised(small_gaussian, tmp_path, what):
    bad = bad_cases(small_gaussian)[what]
    with pytest.raises(DataValidationError) as e:
        validate(bad, tmp_path / "v.json")
    assert what in str(e.value)
    assert len(str(e.value).splitlines()) <= 3  # short: one line per failed expectation
    assert json.loads((tmp_path / "v.json").read_text())["success"] is False


def test_make_refuses_a_dataset_it_does_not_know():
    cfg = config.load(ROOT / "params.yaml").data.model_copy(update={"name": "mnist"})  # past the schema
    with pytest.raises(data.DataError, match="data.name = 'mnist': no such dataset; expected one of .*gauss"):
        data.make(cfg)
