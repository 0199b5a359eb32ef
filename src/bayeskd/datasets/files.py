"""Datasets read from disk through torchvision: `cifar10`, `cifar100` (the "python version" files
under `root`) and `imagefolder` (`root/train/<class>/*`, `root/test/<class>/*`). They share the
`data.images` section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from bayeskd.datasets.base import DataError, Dataset, Split
from bayeskd.declare import PositiveInt, Section, dataset

# per-channel mean and std of the training images, as the standard CIFAR recipes normalise
CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


class Images(Section):
    """Datasets read from disk through torchvision: cifar10, cifar100 (the "python version" files
    under `root`) and imagefolder (`root/train/<class>/*`, `root/test/<class>/*`)."""

    root: str
    download: bool  # cifar only: fetch the files into root when they are missing
    val_fraction: Annotated[float, Field(ge=0, lt=1)]  # held out of train, stratified; 0: none
    image_size: PositiveInt  # imagefolder: images are resized to image_size x image_size


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


@dataset("cifar10", section=Images, key="images", classes=10, images=True, cifar="cifar10")
@dataset("cifar100", section=Images, key="images", classes=100, images=True, cifar="cifar100")
def make_cifar(cfg: Images, seed: int, *, cifar: str) -> Dataset:
    """CIFAR-10 or CIFAR-100 (`cifar`) from torchvision's files under cfg.root (torchvision checks
    their official checksums before reading them)."""
    import torchvision.datasets

    cls_name, folder, mean, std = CIFAR[cifar]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = (cls(cfg.root, train=t, download=cfg.download) for t in (True, False))
    except RuntimeError as e:
        raise DataError(
            f"data.name = {cifar!r}: no intact {cifar} files in {Path(cfg.root) / folder} ({e}). Put the "
            f"python version of the dataset there (torchvision.datasets.{cls_name} reads it), or set "
            f"data.images.download=true to fetch it") from None
    arrays = [np.asarray(d.data).transpose(0, 3, 1, 2) for d in (train, test)]
    return _images(cifar, arrays[0], np.asarray(train.targets), arrays[1], np.asarray(test.targets),
                   len(train.classes), cfg, seed, mean, std)


@dataset("imagefolder", section=Images, key="images", classes=None, images=True)  # classes: the folders'
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
