"""gaussian_images: synthetic images whose Bayes class probability p* is exact
(bayeskd.datasets.gaussian_images)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import multivariate_normal

from bayeskd import config, data, metrics, nets
from bayeskd.datasets import gaussian_images
from bayeskd.train import Checkpoint, TrainSet, fit, predict
from bayeskd.validation import validate
from conftest import ROOT, run, tiny_params
from services import free_port


def cfg(**kw) -> gaussian_images.GaussianImages:
    """The params.yaml section with small images unless told otherwise."""
    base = config.load(ROOT / "params.yaml").data.gaussian_images
    return base.model_copy(update={"n_train": 300, "n_val": 100, "n_test": 1000, "channels": 3,
                                   "image_size": 8, "smoothness": 1.0} | kw)


@pytest.fixture(scope="module")
def small():
    return gaussian_images.make_gaussian_images(cfg(), seed=0)


def test_splits_inputs_and_rows(small):
    ds = small
    assert ds.name == "gaussian_images" and ds.in_shape == (3, 8, 8) and ds.num_classes == 10
    assert {k: len(s.y) for k, s in ds.splits.items()} == {"train": 300, "val": 100, "test": 1000}
    for s in ds.splits.values():
        assert s.x.dtype == np.float32 and s.x.shape[1:] == (3, 8, 8)
        assert 0 <= s.x.min() and s.x.max() <= 1
        np.testing.assert_array_equal(s.x * 255, np.round(s.x * 255))  # on the uint8 grid
        assert s.p.dtype == np.float64 and s.p.shape == (len(s.y), 10) and s.p.min() >= 0
        np.testing.assert_allclose(s.p.sum(1), 1, atol=1e-12)
    test = ds.splits["test"]
    assert ds.info["bayes_accuracy"] == (test.p.argmax(1) == test.y).mean()
    assert ds.info["uint8"] is True and len(ds.info["normalize"]["mean"]) == 3
    facts = ds.info["gaussian_images"]
    assert facts["clipped_fraction"] == 0
    assert facts["quantisation"]["rounding_noise_mean_l1"] < 1e-3


def test_log_densities_are_those_of_the_full_covariance():
    """Woodbury and the determinant lemma against scipy on the explicit D x D covariance, for a
    general (not orthogonal) decoder."""
    rng = np.random.default_rng(1)
    shape, d = (2, 3, 3), 3
    D = int(np.prod(shape))
    model = gaussian_images.ImageModel(rng.normal(size=(D, d)), rng.normal(size=(4, 2, d)), latent_std=0.7,
                                 pixel_noise=0.3, shape=shape, offset=0.4)
    x, y = model.sample(50, rng)
    got = model.log_densities(x)
    cov = 0.7**2 * model.decoder @ model.decoder.T + 0.3**2 * np.eye(D)
    for k in range(4):
        for c in range(2):
            want = multivariate_normal(model.decoder @ model.means[k, c] + 0.4, cov).logpdf(x.reshape(50, D))
            np.testing.assert_allclose(got[:, k, c], want, rtol=1e-11)
    joint = np.log(np.exp(got).sum(2))
    np.testing.assert_allclose(model.posterior(x), np.exp(joint) / np.exp(joint).sum(1, keepdims=True),
                               rtol=1e-10)


def test_posterior_matches_monte_carlo_over_the_latent():
    """An estimate that uses only the sampling process: p(x|y) = E_{z ~ p(z|y)} N(x; W z + b, sigma^2 I),
    averaged over draws of z, against the closed form."""
    model, _ = gaussian_images.build_model(cfg(n_classes=3, channels=1, image_size=3, latent_dim=2,
                                         modes_per_class=2, margin=0, contrast=0.3, pixel_noise=0.1), seed=4)
    rng = np.random.default_rng(0)
    x, _ = model.sample(20, rng)
    x = x.reshape(20, -1).astype(np.float64)
    n = 200_000
    estimate = []
    for k in range(3):
        comp = rng.integers(0, model.means.shape[1], n)
        z = model.means[k, comp] + model.latent_std * rng.standard_normal((n, 2))
        means = z @ model.decoder.T + model.offset  # (n, D)
        sq = (x**2).sum(1)[:, None] - 2 * x @ means.T + (means**2).sum(1)[None]  # (20, n)
        log_lik = -sq / (2 * model.pixel_noise**2)
        top = log_lik.max()
        estimate.append(np.log(np.exp(log_lik - top).mean(1)) + top)
    estimate = np.stack(estimate, 1)
    estimate = np.exp(estimate - estimate.max(1, keepdims=True))
    estimate /= estimate.sum(1, keepdims=True)
    exact = model.posterior(x)
    assert np.abs(exact - estimate).max() < 0.01  # measured: 0.004
    assert np.abs(exact - estimate).mean() < 0.002  # measured: 0.0008


def test_p_star_is_calibrated_on_the_stored_images():
    """On generated (rounded, stored) images, in bins of p*, the share of labels equal to the class is
    p*: calibration within sampling error. A tempered posterior fails the same check."""
    ds = gaussian_images.make_gaussian_images(cfg(n_train=10, n_val=0, n_test=30_000, channels=1, n_classes=4,
                                            latent_dim=4, bayes_accuracy=0.7), seed=2)
    test = ds.splits["test"]
    onehot = np.eye(4)[test.y]

    def worst_z(p):
        bins = np.minimum((p * 10).astype(int), 9)
        z = []
        for b in range(10):
            m = bins == b
            if m.sum() > 100:
                freq, mean = onehot[m].mean(), p[m].mean()
                z.append(abs(freq - mean) / np.sqrt(mean * (1 - mean) / m.sum()))
        return max(z)

    assert worst_z(test.p) < 4.5
    tempered = test.p**2 / (test.p**2).sum(1, keepdims=True)
    assert worst_z(tempered) > 10


def test_flip_is_a_symmetry_of_the_model(small):
    model, _ = gaussian_images.build_model(cfg(), seed=0)
    assert set(model.flip_signs()) == {-1.0, 1.0}
    x = small.splits["test"].x
    np.testing.assert_allclose(model.posterior(x[..., ::-1]), small.splits["test"].p, atol=1e-10)
    np.testing.assert_allclose(model.decoder.T @ model.decoder, model.decoder[:, 0] @ model.decoder[:, 0]
                               * np.eye(model.decoder.shape[1]), atol=1e-10)  # orthogonal, equal norms


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_difficulty_hits_the_target_bayes_accuracy(target):
    ds = gaussian_images.make_gaussian_images(cfg(n_train=10, n_val=0, n_test=20_000, channels=1,
                                            bayes_accuracy=target), seed=1)
    assert abs(ds.info["bayes_accuracy"] - target) < 0.015  # sd of the estimate: 0.0035 or less


def test_seeds_and_nested_splits():
    a = gaussian_images.make_gaussian_images(cfg(n_train=2500, n_val=0), seed=5)
    b = gaussian_images.make_gaussian_images(cfg(n_train=3000, n_val=0), seed=5)
    c = gaussian_images.make_gaussian_images(cfg(n_train=2500, n_val=0), seed=6)
    np.testing.assert_array_equal(a.splits["test"].x, b.splits["test"].x)  # test split independent of n_train
    np.testing.assert_array_equal(a.splits["train"].x, b.splits["train"].x[:2500])  # smaller is a prefix
    assert "val" not in a.splits and a.info == b.info
    assert not np.array_equal(a.splits["test"].x, c.splits["test"].x)


def test_save_load_and_validation(small, tmp_path):
    data.save(small, tmp_path)
    assert json.loads((tmp_path / "info.json").read_text())["uint8"] is True
    with np.load(tmp_path / "train.npz") as z:
        assert z["x"].dtype == np.uint8
    back = data.load(tmp_path)
    assert back.info == small.info and back.in_shape == (3, 8, 8)
    for k, s in small.splits.items():
        np.testing.assert_array_equal(back.splits[k].x, s.x)  # p* was computed on exactly these inputs
        np.testing.assert_array_equal(back.splits[k].p, s.p)
    validate(back, tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["success"]


def test_bad_parameters_are_refused():
    with pytest.raises(config.ParamsError, match="bayes_accuracy = 0.1: must be above chance"):
        config.with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()),
                              {"data.gaussian_images.bayes_accuracy": 0.1})
    with pytest.raises(data.DataError, match="clipped"):
        gaussian_images.make_gaussian_images(cfg(contrast=0.4), seed=0)


@pytest.fixture(scope="module")
def large_test():
    return gaussian_images.make_gaussian_images(cfg(n_train=3000, n_val=0, n_test=20_000), seed=0)


@pytest.mark.parametrize("net,epochs", [("mlp_teacher", 8), ("cnn_student", 6)])
def test_bayes_rule_beats_trained_nets(large_test, tmp_path, net, epochs):
    """Nets trained on the images learn well above chance (10 classes) and stay below the Bayes rule
    on a large test split, in accuracy, NLL and Brier score; the MLP overfits (training accuracy
    above the Bayes accuracy)."""
    ds = large_test
    tr, te = ds.splits["train"], ds.splits["test"]
    torch.manual_seed(0)
    model = nets.build(net, 10, ds.in_shape, ds.info["normalize"])
    optim = config.Optim(epochs=epochs, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                         milestones=[epochs - 2], gamma=0.1)
    history = fit(model, lambda logits, b, e: {"ce": F.cross_entropy(logits, b.y)},
                  TrainSet(torch.from_numpy(tr.x), torch.from_numpy(tr.y)), optim, seed=0,
                  checkpoint=Checkpoint(tmp_path / "ckpt.pt", "-"))
    probs = metrics.softmax(predict(model.eval(), torch.from_numpy(te.x)).numpy())
    got, bayes = metrics.summary(probs, te.y, 15, te.p), metrics.summary(te.p, te.y, 15, te.p)
    assert 0.35 < got["accuracy"] < bayes["accuracy"] == ds.info["bayes_accuracy"]
    assert bayes["nll"] < got["nll"] and bayes["brier"] < got["brier"] and got["bcpd_mse"] > 0.05
    if net == "mlp_teacher":
        assert history[-1]["train/acc"] > bayes["accuracy"] + 0.1


def test_presets_are_valid():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    presets = yaml.safe_load((ROOT / "presets.yaml").read_text())["synthetic"]
    assert set(presets) == {"gaussian_images-gpu", "gaussian_images-cpu"}
    for name in presets:
        parsed = config.parse(config.with_overrides(base, config.preset(name, ROOT / "presets.yaml")))
        assert parsed.data.name == "gaussian_images"
    gpu, cpu = (config.parse(config.with_overrides(base, config.preset(f"gaussian_images-{kind}",
                                                                       ROOT / "presets.yaml")))
                for kind in ("gpu", "cpu"))
    assert (gpu.teacher.net, gpu.student.net) == ("resnet32x4", "resnet8x4")
    assert gpu.data.gaussian_images.n_train == 50_000 and gpu.teacher.optim.epochs == 240
    assert gpu.data.augment.padding == 2 and cpu.data.augment.padding == 2
    assert (cpu.teacher.net, cpu.student.net) == ("resnet20", "resnet8")
    with pytest.raises(config.ParamsError, match="expected one of .*gaussian_images-gpu"):
        config.preset("gaussian_images", ROOT / "presets.yaml")


@pytest.mark.slow
def test_gpu_preset_through_the_pipeline_with_tiny_sizes(project, monkeypatch):
    """The paper-scale preset (resnet32x4 -> resnet8x4, crop-and-flip views) on the CPU, through
    `dvc repro`, with tiny sizes and one epoch; the MLflow server does not answer: tracking that
    fails costs no output, each stage that tracks says so once and writes all it should."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    preset = config.preset("gaussian_images-gpu", ROOT / "presets.yaml")
    tiny = {"data.gaussian_images.n_train": 32, "data.gaussian_images.n_test": 32,
            "teacher.optim.epochs": 1, "student.optim.epochs": 1, "teacher.optim.milestones": [],
            "student.optim.milestones": [], "cache.views": 2, "cache.min_accuracy": 0.0,
            "export.max_abs_diff": 1e-2}  # one epoch on 32 images: batch-norm statistics are far off
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**(preset | tiny)), sort_keys=False))
    result = run(["dvc", "repro"], project)
    out = result.stdout + result.stderr
    assert "prepared gaussian_images: train 32, test 32; 10 classes, input (3, 32, 32)" in out
    assert out.count("MLflow tracking off for this stage") == 3  # train_teacher, distill, export_onnx
    exported = json.loads((project / "reports/export.json").read_text())
    assert all(exported[role]["max_abs_diff"] <= 1e-2 for role in ("teacher", "student"))
    assert (project / "models/student.onnx").stat().st_size > 0 and not (project / "mlflow.db").exists()
    info = json.loads((project / "data/prepared/info.json").read_text())
    m = json.loads((project / "reports/metrics.json").read_text())
    assert m["bayes_accuracy"] == info["bayes_accuracy"]
    for role in ("teacher", "student"):
        assert 0 < m[role]["bcpd_mse"] < 2 and m[role]["accuracy"] < m["bayes_accuracy"]
    manifest = json.loads((project / "cache/teacher_logits/manifest.json").read_text())
    assert manifest["augmentation"] == {"name": "crop_flip", "padding": 2, "views": 50}
    assert json.loads((project / "reports/validation.json").read_text())["success"]
