"""Datasets, and the on-disk format of a prepared dataset.

Embedded (no download): `gaussian`, the paper's synthetic benchmark with its exact Bayes class
probability; `gaussian_images`, synthetic CIFAR-format images with exact p* (`bayeskd.synthetic`);
and `digits`, scikit-learn's 8x8 digits. From disk through torchvision: `cifar10`,
`cifar100` and `imagefolder`.

A prepared dataset is a directory with `info.json` (sealed with the sha256 of its content) and one
`<split>.npz` per split (train, test, and val unless it is empty; zip files with a CRC-32 per array)
holding `x` (inputs), `y` (int64 labels) and, where the Bayes class
probability is known, `p` (float64, p*(y|x) per class). In memory, inputs are float32; images are
in [0, 1], stored on disk as uint8, and their normalisation (`info["normalize"]`, per-channel mean
and std) belongs to the model (`bayeskd.nets.build(..., normalize=...)`), so augmentation pads with
black pixels, as the standard recipe does, and exported models take raw pixels.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bayeskd import config, integrity
from bayeskd.config import Data, Digits, Gaussian, Images
from bayeskd.dataset import DataError, Dataset, Split
from bayeskd.io import json_text, outputs
from bayeskd.synthetic import make_gaussian_images

__all__ = ["DataError", "Dataset", "Split", "load", "make", "save"]

SPLITS = ("train", "val", "test")
# per-channel mean and std of the training images, as the standard CIFAR recipes normalise
CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


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


def _images(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
            test_y: np.ndarray, classes: int, cfg: Images, seed: int, mean, std) -> Dataset:
    """uint8 (N, C, H, W) images to a Dataset, holding out a stratified validation split."""
    from sklearn.model_selection import train_test_split

    to_float = lambda a: (a.astype(np.float32) / 255)  # noqa: E731
    splits = {}
    if cfg.val_fraction > 0:
        if round(cfg.val_fraction * len(train_y)) < classes:
            raise DataError(f"data.images.val_fraction = {cfg.val_fraction} holds out "
                            f"{round(cfg.val_fraction * len(train_y))} of {len(train_y)} training images, "
                            f"fewer than the {classes} classes; raise it, or use 0 for no validation split")
        tr, va = train_test_split(np.arange(len(train_y)), test_size=cfg.val_fraction, stratify=train_y,
                                  random_state=seed)
        splits["val"] = Split(to_float(train_x[va]), train_y[va].astype(np.int64))
        train_x, train_y = train_x[tr], train_y[tr]
    splits = {"train": Split(to_float(train_x), train_y.astype(np.int64)), **splits,
              "test": Split(to_float(test_x), test_y.astype(np.int64))}
    info = {"normalize": {"mean": list(mean), "std": list(std)}, "uint8": True}
    return Dataset(name, classes, tuple(train_x.shape[1:]), splits, (0.0, 1.0), info)


def make_cifar(name: str, cfg: Images, seed: int) -> Dataset:
    """CIFAR-10 or CIFAR-100 from torchvision's files under cfg.root (torchvision checks their
    official checksums before reading them)."""
    import torchvision.datasets

    cls_name, folder, mean, std = CIFAR[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = (cls(cfg.root, train=t, download=cfg.download) for t in (True, False))
    except RuntimeError as e:
        raise DataError(
            f"data.name = {name!r}: no intact {name} files in {Path(cfg.root) / folder} ({e}). Put the "
            f"python version of the dataset there (torchvision.datasets.{cls_name} reads it), or set "
            f"data.images.download=true to fetch it") from None
    arrays = [np.asarray(d.data).transpose(0, 3, 1, 2) for d in (train, test)]
    return _images(name, arrays[0], np.asarray(train.targets), arrays[1], np.asarray(test.targets),
                   len(train.classes), cfg, seed, mean, std)


def make_imagefolder(cfg: Images, seed: int) -> Dataset:
    """A user's images: cfg.root/train/<class>/* and cfg.root/test/<class>/*, resized to
    image_size x image_size RGB; normalised by the training images' own mean and std."""
    import torch
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    resize = v2.Compose([v2.PILToTensor(), v2.Resize((cfg.image_size, cfg.image_size), antialias=True)])
    folders = {}
    for split in ("train", "test"):
        try:
            folders[split] = ImageFolder(str(Path(cfg.root) / split), transform=resize)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"data.name = 'imagefolder': {e}. Put the images in "
                            f"{Path(cfg.root)}/train/<class>/ and {Path(cfg.root)}/test/<class>/") from None
    if folders["train"].classes != folders["test"].classes:
        raise DataError(f"imagefolder: train has classes {folders['train'].classes}, test has "
                        f"{folders['test'].classes}; they must be the same")
    arrays = {s: (torch.stack([img for img, _ in f]).numpy(), np.asarray(f.targets))
              for s, f in folders.items()}
    pixels = arrays["train"][0].astype(np.float64) / 255
    mean, std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3)) + 1e-8
    return _images("imagefolder", *arrays["train"], *arrays["test"], len(folders["train"].classes), cfg,
                   seed, mean.tolist(), std.tolist())


MAKERS: dict[str, Callable[[Data], Dataset]] = {
    "gaussian": lambda cfg: make_gaussian(cfg.gaussian, cfg.seed),
    "gaussian_images": lambda cfg: make_gaussian_images(cfg.gaussian_images, cfg.seed),
    "digits": lambda cfg: make_digits(cfg.digits, cfg.seed),
    "cifar10": lambda cfg: make_cifar("cifar10", cfg.images, cfg.seed),
    "cifar100": lambda cfg: make_cifar("cifar100", cfg.images, cfg.seed),
    "imagefolder": lambda cfg: make_imagefolder(cfg.images, cfg.seed),
}
config.check_registry("dataset", config.DATASETS, MAKERS)


def make(cfg: Data) -> Dataset:
    """The dataset `cfg.name`, generated or read as its section of `cfg` says."""
    if cfg.name not in MAKERS:
        raise DataError(f"data.name = {cfg.name!r}: no such dataset; expected one of {', '.join(MAKERS)}")
    return MAKERS[cfg.name](cfg)


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
