"""`digits`: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np
from pydantic import model_validator

from bayeskd.datasets.base import Dataset, Split
from bayeskd.declare import Fraction, Section, dataset, fractions_leave


class Digits(Section):
    val_fraction: Fraction
    test_fraction: Fraction

    @model_validator(mode="after")
    def _train_split_left(self) -> Digits:
        fractions_leave(self, "val_fraction", "test_fraction", "training")
        return self


@dataset("digits", section=Digits, classes=10, images=True)
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
