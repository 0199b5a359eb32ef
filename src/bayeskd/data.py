"""Making a dataset by name, and the on-disk format of a prepared dataset.

The datasets are declared in bayeskd.datasets: embedded (no download) `gaussian`, the paper's
synthetic benchmark with its exact Bayes class probability; `gaussian_images`, synthetic
CIFAR-format images with exact p*; and `digits`, scikit-learn's 8x8 digits. From disk through
torchvision: `cifar10`, `cifar100` and `imagefolder`. Their in-memory contract (float32 inputs,
images in [0, 1], normalisation in the model) is stated in bayeskd.datasets.

A prepared dataset is a directory with `info.json` (sealed with the sha256 of its content) and one
`<split>.npz` per split (train, test, and val unless it is empty; zip files with a CRC-32 per array)
holding `x` (inputs), `y` (int64 labels) and, where the Bayes class probability is known, `p`
(float64, p*(y|x) per class). Images on the uint8 grid (`info["uint8"]`) are stored as uint8.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from bayeskd import integrity
from bayeskd.config import Data
from bayeskd.datasets import DATASETS
from bayeskd.datasets.base import DataError, Dataset, Split
from bayeskd.io import json_text, outputs

__all__ = ["DataError", "Dataset", "Split", "load", "make", "save"]

SPLITS = ("train", "val", "test")


def make(cfg: Data) -> Dataset:
    """The dataset `cfg.name`, generated or read as its section of `cfg` says."""
    if cfg.name not in DATASETS:
        raise DataError(f"data.name = {cfg.name!r}: no such dataset; expected one of {', '.join(DATASETS)}")
    declared = DATASETS[cfg.name]
    return declared.make(getattr(cfg, declared.key), cfg.seed)


def _to_uint8(x: np.ndarray, rows: int = 4096) -> np.ndarray:
    """round(x * 255) as uint8, a block of rows at a time (no full-size float temporaries)."""
    out = np.empty(x.shape, np.uint8)
    for i in range(0, len(x), rows):
        out[i:i + rows] = np.round(x[i:i + rows] * 255)
    return out


def save(ds: Dataset, directory: str | Path) -> None:
    """Every split, then info.json, all renamed into place together."""
    directory = Path(directory)
    with outputs() as out:
        for name, split in ds.splits.items():
            x = _to_uint8(split.x) if ds.info.get("uint8") else split.x
            arrays = {"x": x, "y": split.y} | ({"p": split.p} if split.p is not None else {})
            buffer = io.BytesIO()  # serialised first: numpy reports a short write without its reason
            np.savez(buffer, **arrays)
            out.path(directory / f"{name}.npz").write_bytes(buffer.getbuffer())
        out.text(directory / "info.json", json_text(integrity.seal({
            "name": ds.name, "num_classes": ds.num_classes, "in_shape": list(ds.in_shape),
            "sizes": {k: len(s.y) for k, s in ds.splits.items()}, "value_range": list(ds.value_range),
            **ds.info,
        })))


def load(directory: str | Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """The prepared dataset in `directory` (those of `splits` it has); DataError if a file is damaged."""
    directory = Path(directory)
    path = directory / "info.json"
    try:
        meta = integrity.unseal(json.loads(path.read_bytes().decode("utf-8")))
        loaded = {}
        for name in (s for s in splits if s in meta["sizes"]):
            path = directory / f"{name}.npz"
            with np.load(path, allow_pickle=False) as z:
                x = z["x"].astype(np.float32) / 255 if meta.get("uint8") else z["x"]
                loaded[name] = Split(x, z["y"], z["p"] if "p" in z.files else None)
        info = {k: v for k, v in meta.items()
                if k not in ("name", "num_classes", "in_shape", "sizes", "value_range")}
        return Dataset(meta["name"], meta["num_classes"], tuple(meta["in_shape"]), loaded,
                       tuple(meta["value_range"]), info)
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:  # JSON: ValueError
        raise DataError(f"{path}: damaged ({type(e).__name__}: {str(e)[:200]}); "
                        f"{integrity.remedy(path)}") from None
