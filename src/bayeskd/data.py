"""Datasets that need no download, and the on-disk format of a prepared dataset.

A prepared dataset is a directory with `info.json` and one `<split>.npz` per split holding
`x` (float32 inputs), `y` (int64 labels) and, where the Bayes class probability is known, `p`
(float64, p*(y|x) per class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bayeskd.config import Data, Digits, Gaussian
from bayeskd.io import atomic_path, write_json

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    p: np.ndarray | None = None  # exact p*(y|x), when known


@dataclass
class Dataset:
    name: str
    num_classes: int
    in_shape: tuple[int, ...]
    splits: dict[str, Split]
    value_range: tuple[float, float]  # every input value must lie in it (checked by validation)
    info: dict = field(default_factory=dict)  # dataset-specific facts, e.g. the Bayes accuracy


def gaussian_bcpd(x: np.ndarray, means: np.ndarray, noise_var: float) -> np.ndarray:
    """p*(k|x) = softmax_k(-||x - mu_k||^2 / (2 sigma^2)) for equal class priors."""
    sq = ((x[:, None, :].astype(np.float64) - means[None]) ** 2).sum(-1)
    logits = -sq / (2 * noise_var)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def make_gaussian(cfg: Gaussian, seed: int) -> Dataset:
    """The paper's synthetic benchmark: class means in {-1, 0, 1}^dim, isotropic noise, uniform prior."""
    rng = np.random.default_rng(seed)
    means = rng.integers(-1, 2, size=(cfg.n_classes, cfg.dim)).astype(np.float64)
    y = rng.integers(0, cfg.n_classes, size=cfg.n_samples)
    x = means[y] + np.sqrt(cfg.noise_var) * rng.standard_normal((cfg.n_samples, cfg.dim))
    p = gaussian_bcpd(x, means, cfg.noise_var)
    n_train = round(cfg.train_fraction * cfg.n_samples)
    n_val = round(cfg.val_fraction * cfg.n_samples)
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
            "test": slice(n_train + n_val, None)}
    splits = {k: Split(x[s].astype(np.float32), y[s].astype(np.int64), p[s]) for k, s in cuts.items()}
    test = splits["test"]
    info = {
        # the accuracy of the Bayes classifier argmax p*(y|x) on the test split
        "bayes_accuracy": float((test.p.argmax(1) == test.y).mean()),
        "noise_var": cfg.noise_var,
    }
    bound = 1 + 12 * np.sqrt(cfg.noise_var)  # the largest mean plus 12 noise standard deviations
    return Dataset("gaussian", cfg.n_classes, (cfg.dim,), splits, (-bound, bound), info)


def make_digits(cfg: Digits, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, scaled to [0, 1], stratified split by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=y, random_state=seed)
    train, val = train_test_split(
        rest, test_size=cfg.val_fraction / (1 - cfg.test_fraction), stratify=y[rest], random_state=seed
    )
    splits = {k: Split(x[i], y[i]) for k, i in (("train", train), ("val", val), ("test", test))}
    return Dataset("digits", 10, (1, 8, 8), splits, (0.0, 1.0))


def make(cfg: Data) -> Dataset:
    if cfg.name == "gaussian":
        return make_gaussian(cfg.gaussian, cfg.seed)
    return make_digits(cfg.digits, cfg.seed)


def save(ds: Dataset, directory: str | Path) -> None:
    directory = Path(directory)
    for name, split in ds.splits.items():
        arrays = {"x": split.x, "y": split.y} | ({"p": split.p} if split.p is not None else {})
        with atomic_path(directory / f"{name}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    write_json(directory / "info.json", {
        "name": ds.name, "num_classes": ds.num_classes, "in_shape": list(ds.in_shape),
        "sizes": {k: len(s.y) for k, s in ds.splits.items()}, "value_range": list(ds.value_range),
        **ds.info,
    })


def load(directory: str | Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    directory = Path(directory)
    meta = json.loads((directory / "info.json").read_text())
    loaded = {}
    for name in splits:
        with np.load(directory / f"{name}.npz", allow_pickle=False) as z:
            loaded[name] = Split(z["x"], z["y"], z["p"] if "p" in z.files else None)
    info = {k: v for k, v in meta.items()
            if k not in ("name", "num_classes", "in_shape", "sizes", "value_range")}
    return Dataset(meta["name"], meta["num_classes"], tuple(meta["in_shape"]), loaded,
                   tuple(meta["value_range"]), info)
