"""Training throughput of this project's loop against a conventional one, in one run.

Teacher resnet32x4 and student resnet8x4 (100 classes, 32x32 images) at batch 64 and a large batch.
This project: `bayeskd.train.fit` on tensors in memory (on the GPU when there is one), the crop-and-
flip views applied to whole batches, normalisation inside the model; bf16 autocast and
channels_last on a GPU. Reference, the common way: a Dataset of PIL images with torchvision's
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize, a DataLoader with worker
processes, fp32. Both train the same architecture with SGD and cross-entropy for the same number
of steps, after a one-step warm-up.

    python benchmarks/train_throughput.py [--steps 4] [--large-batch 256] [--workers 2]

The last line is this loop's throughput divided by the reference's, over all four runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bayeskd import nets
from bayeskd.augment import CropFlip
from bayeskd.config import Optim
from bayeskd.datasets.files import CIFAR
from bayeskd.train import Checkpoint, TrainSet, default_device, fit, seed_everything

_, _, MEAN, STD = CIFAR["cifar100"]


class PILImages(Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels  # uint8 (N, H, W, C)
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.pixels[i])), int(self.labels[i])


def reference(name: str, pixels, labels, batch: int, steps: int, workers: int,
              mixed_precision: bool = False) -> float:
    """Seconds for `steps` steps of the conventional loop (after one warm-up step); with
    `mixed_precision`, the forward under bf16 autocast and the model and batches channels_last."""
    device = default_device()
    torch.manual_seed(0)
    layout = torch.channels_last if mixed_precision else torch.preserve_format
    model = nets.build(name, 100, (3, 32, 32)).to(device, memory_format=layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(PILImages(pixels, labels), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, pin_memory=device.type == "cuda")
    start = None
    for step, (x, y) in enumerate(loader):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            logits = model(x.to(device, non_blocking=True, memory_format=layout))
            loss = F.cross_entropy(logits, y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ours(name: str, pixels, labels, batch: int, steps: int, workdir: Path, compiled: bool) -> float:
    """Seconds for `steps` steps of `bayeskd.train.fit` (after one warm-up step)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    seconds = []
    for label, n_steps in (("warm-up", 1), ("timed", steps)):
        seed_everything(0)
        model = nets.build(name, 100, (3, 32, 32), normalize={"mean": MEAN, "std": STD})
        cfg = Optim(epochs=1, batch_size=batch, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[],
                    gamma=0.1)
        start = time.perf_counter()
        data = TrainSet(x[: n_steps * batch], y[: n_steps * batch], CropFlip(4))
        fit(model, lambda logits, b, e: {"ce": F.cross_entropy(logits, b.y)}, data, cfg, seed=0,
            checkpoint=Checkpoint(workdir / f"{name}-{batch}-{label}.pt", label),
            name=f"{name} batch {batch}", compiled=compiled)
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--large-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    parser.add_argument("--compile", action="store_true", help="this loop with compute.compile (the warm-up "
                        "step compiles)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = (args.steps + 1) * args.large_batch
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n).astype(np.int64)
    print(f"device: {default_device()}; {args.steps} timed steps per run")
    total_ours = total_ref = images = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet32x4", "resnet8x4"):
            for batch in (64, args.large_batch):
                t_ref = reference(name, pixels, labels, batch, args.steps, args.workers)
                t_ours = ours(name, pixels, labels, batch, args.steps, Path(tmp), args.compile)
                done = args.steps * batch
                print(f"{name:10s} batch {batch:4d}: this loop {done / t_ours:8.1f} images/s, "
                      f"reference {done / t_ref:8.1f} images/s, ratio {t_ref / t_ours:.2f}")
                total_ours, total_ref, images = total_ours + t_ours, total_ref + t_ref, images + done
    print(f"overall: this loop {images / total_ours:.1f} images/s, "
          f"reference {images / total_ref:.1f} images/s")
    print(f"this loop / reference: {total_ref / total_ours:.2f}")


if __name__ == "__main__":
    main()
