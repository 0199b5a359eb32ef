"""Training throughput of this project's loop against a conventional one, in one run.

Teacher resnet32x4 and student resnet8x4 (100 classes, 32x32 images) at batch 64 and a large batch.
This project: the steps of `bayeskd.train` (`Placement.batches`, `train_step`, `Tally`: what `fit`
runs per step) on tensors in memory (on the GPU when there is one), the crop-and-flip views applied
to whole batches, normalisation inside the model; bf16 autocast and channels_last on a GPU.
Reference, the common way: a Dataset of PIL images with torchvision's RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize, a DataLoader with worker processes, fp32, run as
common code runs it (no deterministic algorithms, cuDNN's autotuner on). Both train the same
architecture with SGD and cross-entropy, timed over the same span: `steps` steps after one warm-up
step (which pays for the DataLoader's workers and the epoch's placement alike), the GPU drained
before and after. On a GPU, torch.cuda.set_sync_debug_mode counts the host syncs of the timed steps.

    python benchmarks/train_throughput.py [--steps 4] [--large-batch 256] [--workers 2]

The last line is this loop's throughput divided by the reference's, over all four runs.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bayeskd import nets, placement
from bayeskd.augment import CropFlip
from bayeskd.batch import LossFn
from bayeskd.config import Optim
from bayeskd.datasets.files import CIFAR
from bayeskd.train import Placement, Tally, TrainSet, epoch_draws, make_optimizer, seed_everything, train_step

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


@contextlib.contextmanager
def algorithms(deterministic: bool, benchmark: bool) -> Iterator[None]:
    """torch's deterministic-algorithms switch and cuDNN's autotuner set as given; restored
    afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def common_practice() -> contextlib.AbstractContextManager:
    """The settings common training code runs with: no deterministic algorithms, cuDNN's autotuner
    on (this project's loop asks for deterministic algorithms)."""
    return algorithms(deterministic=False, benchmark=True)


@contextlib.contextmanager
def counted_syncs(device: torch.device) -> Iterator[list]:
    """Within the block, every host sync with a CUDA device warns (torch.cuda.set_sync_debug_mode);
    the list yielded holds them after the block. On the CPU nothing is counted."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    seen[:] = [w for w in seen if "synchroniz" in str(w.message)]


def timed(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds for `steps` calls of `step` after one warm-up call, the device drained before and
    after; and the host syncs per timed step (None on the CPU, where there is no device to wait for)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with counted_syncs(device) as syncs:
        for _ in range(steps):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (len(syncs) / steps if device.type == "cuda" else None)


def reference(name: str, pixels, labels, batch: int, steps: int, workers: int,
              mixed_precision: bool = False) -> tuple[float, float | None]:
    """Seconds (and host syncs per step) for `steps` steps of the conventional loop; with
    `mixed_precision`, the forward under bf16 autocast and the model and batches channels_last."""
    device = placement.choose("auto")
    torch.manual_seed(0)
    layout = torch.channels_last if mixed_precision else torch.preserve_format
    with common_practice():
        model = nets.build(name, 100, (3, 32, 32)).to(device, memory_format=layout).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        loader = DataLoader(PILImages(pixels, labels), batch_size=batch, shuffle=True, num_workers=workers,
                            drop_last=True, pin_memory=device.type == "cuda")
        batches = iter(loader)

        def step() -> None:
            x, y = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                logits = model(x.to(device, non_blocking=True, memory_format=layout))
                loss = F.cross_entropy(logits, y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return timed(step, steps, device)


def loop_steps(model: nn.Module, loss_fn: LossFn, data: TrainSet, batch: int, steps: int,
               extra: nn.Module | None = None, compiled: bool = False) -> tuple[float, float | None]:
    """Seconds (and host syncs per step) for `steps` steps of this project's loop on `data`, which
    holds the steps + 1 batches of one epoch: placement and the epoch's draws come first, untimed."""
    device = placement.choose("auto")
    extra = extra or nn.Module()
    place = Placement.of(model, extra, data, device, batch, compiled=compiled)
    opt = make_optimizer([*model.parameters(), *extra.parameters()],
                         Optim(epochs=1, batch_size=batch, lr=0.05, momentum=0.9, weight_decay=5e-4,
                               milestones=[], gamma=0.1))
    model.train()
    extra.train()
    order, drawn = epoch_draws(len(data.y), 0, 0, data.slots)
    batches, tally = place.batches(order, drawn), Tally(device)

    def step() -> None:
        b = next(batches)
        tally.add(*train_step(place, loss_fn, opt, extra, b, 0), b)

    return timed(step, steps, device)


def ours(name: str, pixels, labels, batch: int, steps: int,
         compiled: bool = False) -> tuple[float, float | None]:
    """Seconds (and host syncs per step) for `steps` steps of this project's loop."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    seed_everything(0)
    model = nets.build(name, 100, (3, 32, 32), normalize={"mean": MEAN, "std": STD})
    data = TrainSet(x[: (steps + 1) * batch], y[: (steps + 1) * batch], CropFlip(4))
    return loop_steps(model, lambda logits, b, e: {"ce": F.cross_entropy(logits, b.y)}, data, batch, steps,
                      compiled=compiled)


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
    print(f"device: {placement.choose('auto')}; {args.steps} timed steps per run")
    total_ours = total_ref = images = 0.0
    for name in ("resnet32x4", "resnet8x4"):
        for batch in (64, args.large_batch):
            t_ref, _ = reference(name, pixels, labels, batch, args.steps, args.workers)
            t_ours, syncs = ours(name, pixels, labels, batch, args.steps, args.compile)
            done = args.steps * batch
            print(f"{name:10s} batch {batch:4d}: this loop {done / t_ours:8.1f} images/s, "
                  f"reference {done / t_ref:8.1f} images/s, ratio {t_ref / t_ours:.2f}"
                  + ("" if syncs is None else f", host syncs per step {syncs:g}"))
            total_ours, total_ref, images = total_ours + t_ours, total_ref + t_ref, images + done
    print(f"overall: this loop {images / total_ours:.1f} images/s, "
          f"reference {images / total_ref:.1f} images/s")
    print(f"this loop / reference: {total_ref / total_ours:.2f}")


if __name__ == "__main__":
    main()
