"""The in-memory dataset record that every dataset maker returns (its contract: the package
docstring). It imports nothing of bayeskd but the error base."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bayeskd.io import Failure


class DataError(Failure):
    """The dataset's files are missing or do not fit what the parameters ask for."""


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
