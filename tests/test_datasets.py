"""cifar10, cifar100 and imagefolder on small fixtures in their real on-disk formats."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import yaml
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from bayeskd import config, data
from bayeskd.datasets.files import Images, make_cifar, make_imagefolder
from conftest import ROOT, check_dataset_contract, run, tiny_params


def images_cfg(root, **kw):
    return Images(**({"root": str(root), "download": False, "val_fraction": 0.0, "image_size": 32}
                            | kw))


def write_batch(path, images, labels, label_key):
    """One CIFAR "python version" batch file: rows of 1024 red, 1024 green, 1024 blue bytes."""
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1), label_key: labels.tolist(),
                     "batch_label": "fixture", "filenames": [f"{i}.png" for i in range(len(labels))]}, f)
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_fixture(root, name, monkeypatch, n_train, n_test, seed=0):
    """Fixture files as torchvision reads them. Their checksums replace the official ones in
    torchvision's table (a fixture cannot have the real files' MD5s); the reading code is unchanged."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    ytr, yte = np.arange(n_train) % classes, np.arange(n_test) % classes
    key = "labels" if name == "cifar10" else "fine_labels"
    if name == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        names = [f"data_batch_{i + 1}" for i in range(5)]
        train_list = [[n, write_batch(folder / n, train[p], ytr[p], key)]
                      for n, p in zip(names, parts, strict=True)]
        test_list = [["test_batch", write_batch(folder / "test_batch", test, yte, key)]]
    else:
        train_list = [["train", write_batch(folder / "train", train, ytr, key)]]
        test_list = [["test", write_batch(folder / "test", test, yte, key)]]
    meta = folder / cls.meta["filename"]
    with open(meta, "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", cls.meta | {"md5": hashlib.md5(meta.read_bytes()).hexdigest()})
    return train, ytr, test, yte


@pytest.mark.parametrize("name,val", [("cifar10", 20), ("cifar100", 100)])
def test_cifar_fixture_is_read_pixel_for_pixel(tmp_path, monkeypatch, name, val):
    train, ytr, test, yte = cifar_fixture(tmp_path, name, monkeypatch, 200, 100)
    ds = make_cifar(images_cfg(tmp_path, val_fraction=val / 200), seed=0, cifar=name)
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.in_shape == (3, 32, 32)
    assert len(ds.splits["train"].y) == 200 - val and len(ds.splits["val"].y) == val
    assert set(ds.splits["val"].y) == set(range(ds.num_classes))  # stratified
    np.testing.assert_array_equal(ds.splits["test"].x, test.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.splits["test"].y, yte)
    assert ds.info["normalize"]["mean"][0] == pytest.approx(0.4914 if name == "cifar10" else 0.5071)

    data.save(ds, tmp_path / "prepared")
    assert json.loads((tmp_path / "prepared/info.json").read_text())["uint8"] is True
    back = data.load(tmp_path / "prepared")
    for split in ("train", "val", "test"):  # uint8 on disk, the same floats in memory
        np.testing.assert_array_equal(back.splits[split].x, ds.splits[split].x)


def test_validation_split_too_small_for_the_classes(tmp_path, monkeypatch):
    cifar_fixture(tmp_path, "cifar100", monkeypatch, 200, 100)
    with pytest.raises(data.DataError, match="val_fraction = 0.1 holds out 20 of 200 .* fewer than the 100"):
        make_cifar(images_cfg(tmp_path, val_fraction=0.1), seed=0, cifar="cifar100")


def test_missing_cifar_files_say_where_they_go(tmp_path):
    with pytest.raises(data.DataError) as e:
        make_cifar(images_cfg(tmp_path), seed=0, cifar="cifar100")
    assert str(tmp_path / "cifar-100-python") in str(e.value) and "data.images.download=true" in str(e.value)


def png_folder(root, classes, per_class, sizes):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder_resizes_and_normalises_by_its_own_statistics(tmp_path):
    png_folder(tmp_path, ["cat", "dog", "eel"], 4, [(20, 30), (40, 40)])
    ds = make_imagefolder(images_cfg(tmp_path, image_size=16, val_fraction=0.25), seed=0)
    assert ds.num_classes == 3 and ds.in_shape == (3, 16, 16)
    assert {k: len(s.y) for k, s in ds.splits.items()} == {"train": 9, "val": 3, "test": 12}
    assert 0.0 <= ds.splits["train"].x.min() and ds.splits["train"].x.max() <= 1.0
    assert len(ds.info["normalize"]["std"]) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(data.DataError, match="train/<class>/"):
        make_imagefolder(images_cfg(tmp_path / "none"), seed=0)
    png_folder(tmp_path, ["a", "b"], 1, [(8, 8)])
    (tmp_path / "test" / "c").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / "c" / "x.png")
    with pytest.raises(data.DataError, match="must be the same"):
        make_imagefolder(images_cfg(tmp_path), seed=0)


def offline_data(name, tmp_path, monkeypatch):
    """Params for a small dataset `name` that can be made here: the embedded ones shrunk, the others
    on fixture files."""
    small_images = {"n_train": 100, "n_val": 20, "n_test": 100, "image_size": 8, "smoothness": 1.0}
    overrides = {"data.name": name, "data.images.root": str(tmp_path / "files"),
                 "data.images.val_fraction": 0.5, "data.gaussian.n_samples": 1000,
                 **{f"data.gaussian_images.{k}": v for k, v in small_images.items()}}
    if name in ("cifar10", "cifar100"):
        cifar_fixture(tmp_path / "files", name, monkeypatch, 200, 100)
    if name == "imagefolder":
        png_folder(tmp_path / "files", ["cat", "dog"], 4, [(20, 30)])
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    return config.parse(config.with_overrides(base, overrides)).data


@pytest.mark.parametrize("name", ["gaussian", "gaussian_images", "digits", "cifar10", "cifar100",
                                  "imagefolder"])
def test_every_dataset_keeps_the_contract(name, tmp_path, monkeypatch):
    cfg = offline_data(name, tmp_path, monkeypatch)
    check_dataset_contract(data.make(cfg), cfg, tmp_path / "prepared")


def test_every_preset_is_valid_and_unknown_ones_are_refused():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    presets = yaml.safe_load((ROOT / "presets.yaml").read_text())["pairs"]
    assert len(presets) == 11
    for name in presets:
        parsed = config.parse(config.with_overrides(base, config.preset(name, ROOT / "presets.yaml")))
        assert parsed.data.name == "cifar100" and parsed.teacher.optim.epochs == 240
    assert config.preset("vgg13-MobileNetV2", ROOT / "presets.yaml")["student.optim.lr"] == 0.01
    with pytest.raises(config.ParamsError, match="'resnet9' does not exist; expected one of resnet32x4-"):
        config.preset("resnet9", ROOT / "presets.yaml")


# The sitecustomize of the stage processes below: the fixture's checksums go into torchvision's CIFAR
# table when a process imports it, and only then (importing torchvision in every Python process,
# DVC's own included, would cost each of them seconds).
FIXTURE_TABLE = """import importlib.abc, importlib.util, sys


class FixtureTable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.datasets.cifar":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.CIFAR100.train_list = {train!r}
            module.CIFAR100.test_list = {test!r}
            module.CIFAR100.meta = {meta!r}

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, FixtureTable())
"""


@pytest.mark.slow
def test_one_cifar_pair_through_the_real_pipeline(project, monkeypatch):
    """resnet56 -> resnet20 (a preset) for one epoch on a CIFAR-100 fixture, through `dvc repro`."""
    preset = config.preset("resnet56-resnet20", ROOT / "presets.yaml")
    quick = {"teacher.optim.epochs": 1, "student.optim.epochs": 1, "teacher.optim.milestones": [],
             "student.optim.milestones": [], "cache.views": 2, "data.images.root": "cifar",
             "cache.min_accuracy": 0.0,  # random fixture labels: the teacher is at chance
             # after one epoch on 100 images batch-norm statistics are far off and logits huge, so
             # float32 rounding alone exceeds 1e-4 (test_zoo checks 1e-4 with realistic statistics)
             "export.max_abs_diff": 1e-2}
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**(preset | quick)), sort_keys=False))
    # torchvision checks the files against its table, so the fixture's checksums must reach the
    # stage processes too: the fixture is the official file set for this copy of the project
    cifar_fixture(project / "cifar", "cifar100", monkeypatch, 100, 100)
    sitecustomize = project / "fixture_site" / "sitecustomize.py"
    sitecustomize.parent.mkdir()
    sitecustomize.write_text(FIXTURE_TABLE.format(train=CIFAR100.train_list, test=CIFAR100.test_list,
                                                  meta=CIFAR100.meta))
    monkeypatch.setenv("PYTHONPATH", str(sitecustomize.parent))
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0 <= metrics["student"]["accuracy"] <= 1 and "bcpd_mse" not in metrics["teacher"]
    exported = json.loads((project / "reports/export.json").read_text())
    assert exported["teacher"]["max_abs_diff"] <= 1e-2 and exported["student"]["max_abs_diff"] <= 1e-2
    manifest = json.loads((project / "cache/teacher_logits/manifest.json").read_text())
    assert manifest["augmentation"] == {"name": "crop_flip", "padding": 4, "views": 162}
    assert manifest["num_samples"] == 100 and manifest["num_slots"] == 2


def test_preset_list_names_every_preset(capsys):
    from bayeskd import cli

    cli.main(["--repo", str(ROOT), "preset", "--list"])
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(config.presets_in(ROOT / "presets.yaml")) == 13
    assert "resnet32x4-resnet8x4: cifar100, resnet32x4 -> resnet8x4" in listed
    assert "gaussian_images-cpu: gaussian_images, resnet20 -> resnet8" in listed
