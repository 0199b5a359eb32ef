"""`gaussian`: the paper's synthetic benchmark, with its exact Bayes class probability."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field, model_validator

from bayeskd.datasets.base import Dataset, Split
from bayeskd.declare import Fraction, PositiveInt, Section, bounded, dataset, fractions_leave


class Gaussian(Section):
    n_samples: bounded(1, 10_000_000, "more is taken for a typo (the paper's benchmark draws 100,000)")
    n_classes: Annotated[int, Field(ge=2)]
    dim: PositiveInt
    noise_var: Annotated[float, Field(gt=0)]
    train_fraction: Fraction
    val_fraction: Fraction

    @model_validator(mode="after")
    def _test_split_left(self) -> Gaussian:
        fractions_leave(self, "train_fraction", "val_fraction", "test")
        n = self.n_samples
        n_train, n_val = round(self.train_fraction * n), round(self.val_fraction * n)  # as make_gaussian
        sizes = {"training": n_train, "validation": n_val, "test": n - n_train - n_val}
        if min(sizes.values()) < self.n_classes:
            shown = ", ".join(f"{size} {split}" for split, size in sizes.items())
            raise ValueError(f"n_samples = {n} gives {shown} samples; each split needs at least n_classes = "
                             f"{self.n_classes} (the data validation expects every class in every split)")
        return self


def gaussian_bcpd(x: np.ndarray, means: np.ndarray, noise_var: float) -> np.ndarray:
    """p*(k|x) = softmax_k(-||x - mu_k||^2 / (2 sigma^2)) for equal class priors."""
    sq = ((x[:, None, :].astype(np.float64) - means[None]) ** 2).sum(-1)
    logits = -sq / (2 * noise_var)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@dataset("gaussian", section=Gaussian, classes=lambda cfg: cfg.n_classes, images=False)
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
