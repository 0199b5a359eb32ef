"""The one training loop, used for teachers and students alike.

SGD with momentum and a step schedule. After every epoch the loop writes a checkpoint (weights,
optimizer state, metric history, and a fingerprint of what is being trained); a rerun with the same
fingerprint resumes from it. Each epoch draws, from one generator seeded by (seed, epoch), first the
batch order and then one augmentation view per sample, so a resumed run is bit-identical to an
uninterrupted one on CPU, and a student reading teacher logits from a cache of all views sees
exactly the views, hence the supervision, of an online run with the same seed.

Devices: CUDA when present (data kept on the GPU, bf16 autocast, channels_last for images), else
the CPU. Several processes: under `torchrun` the same loop runs data-parallel (DDP; gloo on CPUs,
NCCL on GPUs). Every rank draws the same global batch of `batch_size` samples and takes its own
contiguous part of it; DDP averages the gradients, so a step equals a single process's step on the
whole batch and the learning rate stays as it is. (To grow the global batch with more GPUs instead,
scale the learning rate linearly with it.) On GPUs, batch norm is synchronised across the processes
(SyncBatchNorm); gloo has no SyncBatchNorm, so CPU processes normalise with their own part.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bayeskd.augment import CropFlip
from bayeskd.config import Optim
from bayeskd.io import atomic_path


@dataclass
class Batch:
    x: Tensor  # inputs, augmented when training with views
    y: Tensor
    idx: Tensor  # sample indices into the training set
    slots: Tensor | None = None  # per sample: the column of `view_table` drawn
    views: Tensor | None = None  # per sample: the view id applied to x


# loss_fn(logits, batch, epoch) -> named loss terms, summed for the gradient
LossFn = Callable[[Tensor, Batch, int], dict[str, Tensor]]
EpochHook = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPUs
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _on_device(x: Tensor, device: torch.device) -> Tensor:
    """The training inputs on the GPU when they fit in half its free memory, else in pinned memory."""
    if device.type != "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.nbytes < free // 2 else x.pin_memory()


def lr_at(cfg: Optim, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: lr * gamma^(number of milestones already passed)."""
    return cfg.lr * cfg.gamma ** sum(m <= epoch for m in cfg.milestones)


def epoch_draws(n: int, seed: int, epoch: int, slots: int | None) -> tuple[Tensor, Tensor | None]:
    """The epoch's batch order and, when training on views, one slot in [0, slots) per sample."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(n, generator=g)
    return order, (torch.randint(0, slots, (n,), generator=g) if slots else None)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Logits of `model` in eval mode, in batches, on the model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if ckpt.get("fingerprint") != fingerprint:
        print(f"checkpoint {path} belongs to other parameters or inputs; starting afresh", flush=True)
        return None
    return ckpt


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    cfg: Optim,
    *,
    seed: int,
    checkpoint: str | Path,
    fingerprint: str,
    val: tuple[Tensor, Tensor] | None = None,
    on_epoch: EpochHook | None = None,
    name: str = "model",
    augment: CropFlip | None = None,
    view_table: Tensor | None = None,
    extra: nn.Module | None = None,
    compiled: bool = False,
) -> list[dict[str, float]]:
    """Train `model` in place for cfg.epochs epochs; return the per-epoch metrics.

    With `augment`, every sample is seen in one view per epoch: a view id drawn uniformly, or, with
    `view_table` (samples x slots of view ids, as a logit cache holds them), a slot drawn uniformly
    and the view id it names.

    `extra` holds trainable parts that belong to the loss (a distillation method's connectors, heads,
    memory banks): they train with the model and are checkpointed with it, but are not the model.

    `compiled` runs the training forward through torch.compile (the first steps pay for compiling).

    `on_epoch(epoch, metrics)` is called once per epoch in order, also for the epochs restored
    from a checkpoint, so a logger sees the same sequence whether or not the run was resumed.
    """
    checkpoint = Path(checkpoint)
    rank, world = distributed()
    device = default_device()
    cuda = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if cuda and x.dim() == 4 else torch.preserve_format)
    x, y = _on_device(x, device), y.to(x.device if cuda else "cpu")
    if world > 1 and cuda:  # batch-norm statistics of the global batch, as one process would have them
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root (no net is a bare BN)
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    net = torch.compile(net) if compiled else net
    extra = (extra or nn.Module()).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    opt = torch.optim.SGD([*model.parameters(), *extra.parameters()], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    ckpt = _load_checkpoint(checkpoint, fingerprint)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        extra.load_state_dict(ckpt["extra"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        if rank == 0:
            print(f"{name}: resuming after epoch {len(history)}/{cfg.epochs} from {checkpoint}", flush=True)
    for epoch, metrics in enumerate(history):
        if on_epoch and rank == 0:
            on_epoch(epoch, metrics)

    n = len(y)
    slots = None if augment is None else (augment.num_views if view_table is None else view_table.shape[1])
    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        extra.train()
        sums: dict[str, float] = {}
        correct = 0
        order, drawn = epoch_draws(n, seed, epoch, slots)
        for step in order.split(cfg.batch_size):
            idx = step.tensor_split(world)[rank]  # this rank's part of the global batch
            on = idx.to(x.device)
            batch = Batch(x[on].to(device, non_blocking=True), y[on].to(device), idx)
            if augment is not None:
                batch.slots = drawn[idx]
                batch.views = batch.slots if view_table is None else view_table[idx, batch.slots]
                batch.x = augment.apply(batch.x, batch.views)
            with autocast():
                logits = net(batch.x)
                terms = loss_fn(logits, batch, epoch)
                loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # DDP averages the model's gradients; the extra parts' the same way
                for p in extra.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            for k, v in (terms | {"loss": loss}).items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
            correct += (logits.argmax(1) == batch.y).sum().item()
        if world > 1:  # epoch totals over all ranks
            totals = torch.tensor([*sums.values(), correct], dtype=torch.float64)
            dist.all_reduce(totals)
            sums, correct = dict(zip(sums, totals[:-1].tolist(), strict=True)), int(totals[-1])
        if not all(np.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"{name}: the loss became non-finite in epoch {epoch + 1}; "
                                     f"lower the learning rate (now {lr})")
        metrics = {f"train/{k}": v / n for k, v in sums.items()} | {"train/acc": correct / n, "lr": lr}
        if val is not None:
            val_logits = predict(model, val[0])
            metrics["val/acc"] = (val_logits.argmax(1) == val[1]).float().mean().item()
            metrics["val/nll"] = F.cross_entropy(val_logits, val[1]).item()
        history.append(metrics)
        if rank == 0:
            with atomic_path(checkpoint) as tmp:
                torch.save({"fingerprint": fingerprint, "model": model.state_dict(),
                            "extra": extra.state_dict(), "optimizer": opt.state_dict(),
                            "rng": torch.get_rng_state(), "history": history}, tmp)
            if on_epoch:
                on_epoch(epoch, metrics)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{name} epoch {epoch + 1}/{cfg.epochs} {shown} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
    model.cpu()
    extra.cpu()
    return history
