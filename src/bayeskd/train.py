"""The one training loop, used for teachers and students alike.

`fit` reads top to bottom: place the model and data (`_Placement`), restore the last checkpoint if
it belongs to this run, then one `_epoch` after another, each ending in a checkpoint and a log line.

SGD with momentum and a step schedule (`make_optimizer`, `lr_at`). After every epoch the loop writes a
checkpoint (weights, optimizer state, metric history, the RNG state, and a fingerprint of what is
being trained); a rerun with the same fingerprint resumes from it. Each epoch draws, from one
generator seeded by (seed, epoch), first the batch order and then one augmentation view per sample,
so a resumed run is bit-identical to an uninterrupted one on CPU, and a student reading teacher
logits from a cache of all views sees exactly the views, hence the supervision, of an online run
with the same seed.

Devices: CUDA when present (data kept on the GPU, bf16 autocast, channels_last for images), else the
CPU. bf16 autocast and channels_last are arguments (`mixed_precision`, `channels_last`, on by
default for CUDA only), so their logic also runs, and is tested, on the CPU. The loop waits for the
device once per epoch: loss terms and accuracy accumulate on the device. Several processes: under
`torchrun` the same loop runs data-parallel (DDP; gloo on CPUs, NCCL on GPUs). Every rank draws the
same global batch of `batch_size` samples and takes its own contiguous part of it; DDP averages the
gradients, so a step equals a single process's step on the whole batch and the learning rate stays
as it is. On GPUs, batch norm is synchronised across the processes (SyncBatchNorm); gloo has no
SyncBatchNorm, so CPU processes normalise with their own part.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bayeskd.augment import CropFlip
from bayeskd.batch import Batch, EpochHook, LossFn
from bayeskd.config import Optim
from bayeskd.io import Failure, atomic_path


class TrainingError(Failure):
    """Training cannot go on (a non-finite loss); the message says what to change."""


@dataclass
class TrainSet:
    """The training samples as the loop sees them: inputs, labels and, with `augment`, one view per
    sample per epoch, drawn uniformly from the view space or, with `view_table` (samples x slots of
    view ids, as a logit cache holds them), a slot drawn uniformly and the view it names."""

    x: Tensor
    y: Tensor
    augment: CropFlip | None = None
    view_table: Tensor | None = None

    @property
    def slots(self) -> int | None:
        if self.augment is None:
            return None
        return self.augment.num_views if self.view_table is None else self.view_table.shape[1]


def seed_everything(seed: int) -> None:
    """Seed torch and ask for deterministic algorithms: on the CPU runs then repeat bit for bit; on
    a GPU, an op with no deterministic CUDA kernel warns instead of stopping the run (a repeated
    seed there agrees within a tolerance that benchmarks/gpu_check.py measures)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPUs
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())


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


def make_optimizer(params: Iterable[nn.Parameter], cfg: Optim) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


def _content_sha256(state: object) -> str:
    """The sha256 of a checkpoint's content: its tensors (dtype, shape, bytes) and other values."""
    h = hashlib.sha256()

    def walk(x: object) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"tensor {t.dtype} {tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for key in sorted(x, key=repr):
                h.update(repr(key).encode())
                walk(x[key])
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__} {len(x)}".encode())
            for value in x:
                walk(value)
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


class Checkpoint:
    """The training state after the last finished epoch, at `path`, for the run named by
    `fingerprint` only, with the sha256 of its content. Loaded with weights_only=True; an unreadable
    or damaged file is moved aside."""

    KEYS = {"fingerprint", "model", "extra", "optimizer", "rng", "history"}

    def __init__(self, path: str | Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            if not (isinstance(state, dict) and self.KEYS <= state.keys()):
                raise ValueError("not a training checkpoint")
            if state.pop("sha256", None) != _content_sha256(state):  # torch.load checks no checksum
                raise ValueError("its content does not match its sha256")
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            print(f"warning: checkpoint {self.path} is unreadable ({type(e).__name__}); moved to {aside}, "
                  "training starts afresh", flush=True)
            return None
        if state["fingerprint"] != self.fingerprint:
            print(f"checkpoint {self.path} belongs to other parameters or inputs; starting afresh",
                  flush=True)
            return None
        return state

    def save(self, **state: object) -> None:
        buffer = io.BytesIO()  # serialised first, so that a failed write is an OSError of ours
        state = {"fingerprint": self.fingerprint, **state}
        torch.save(state | {"sha256": _content_sha256(state)}, buffer)
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(buffer.getbuffer())


@dataclass
class _Placement:
    """The model on its device, wrapped for DDP and torch.compile as asked; the training data where
    the steps read it; the autocast context of the forward pass."""

    net: nn.Module
    device: torch.device
    x: Tensor
    y: Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]

    @classmethod
    def of(cls, model: nn.Module, extra: nn.Module, data: TrainSet, world: int, compiled: bool,
           mixed_precision: bool | None, channels_last: bool | None) -> _Placement:
        device = default_device()
        cuda = device.type == "cuda"
        mixed_precision = cuda if mixed_precision is None else mixed_precision
        channels_last = (cuda if channels_last is None else channels_last) and data.x.dim() == 4
        model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        extra.to(device)
        x = data.x
        if cuda:  # on the GPU when it fits in half its free memory, else pinned for fast copies
            x = x.to(device) if x.nbytes < torch.cuda.mem_get_info(device)[0] // 2 else x.pin_memory()
        if world > 1 and cuda:  # batch-norm statistics of the global batch, as one process has them
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root (no net is a bare BN)
        net = model
        if world > 1:
            net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        net = torch.compile(net) if compiled else net

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision)

        return cls(net, device, x, data.y.to(x.device), autocast)


def _epoch(place: _Placement, loss_fn: LossFn, opt: torch.optim.Optimizer, extra: nn.Module,
           data: TrainSet, order: Tensor, drawn: Tensor | None, batch_size: int, epoch: int,
           rank: int, world: int, progress) -> dict[str, float]:
    """One pass over the training set in `order`; the summed loss terms and the correct count. The
    sums stay on the device: the host waits for the device once, at the end."""
    device = place.device
    sums: dict[str, Tensor] = {}
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for step in order.split(batch_size):
        idx = step.tensor_split(world)[rank]  # this rank's part of the global batch
        on = idx.to(place.x.device)
        batch = Batch(place.x[on].to(device, non_blocking=True), place.y[on].to(device), idx)
        if data.augment is not None:
            batch.slots = drawn[idx]
            batch.views = batch.slots if data.view_table is None else data.view_table[idx, batch.slots]
            batch.x = data.augment.apply(batch.x, batch.views)
        with place.autocast():
            logits = place.net(batch.x)
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
            sums[k] = sums.get(k, 0) + v.detach().double() * len(idx)
        correct += (logits.argmax(1) == batch.y).sum()
        progress.update(1)
    totals = torch.stack([*sums.values(), correct.double()])
    if world > 1:  # epoch totals over all ranks
        dist.all_reduce(totals)
    *values, right = totals.tolist()  # the epoch's one wait for the device
    return dict(zip(sums, values, strict=True)) | {"correct": right}


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: TrainSet,
    cfg: Optim,
    *,
    seed: int,
    checkpoint: Checkpoint,
    val: tuple[Tensor, Tensor] | None = None,
    on_epoch: EpochHook | None = None,
    extra: nn.Module | None = None,
    compiled: bool = False,
    mixed_precision: bool | None = None,
    channels_last: bool | None = None,
    name: str = "model",
) -> list[dict[str, float]]:
    """Train `model` in place for cfg.epochs epochs; return the per-epoch metrics.

    `extra` holds trainable parts that belong to the loss (a distillation method's connectors, heads,
    memory banks): they train with the model and are checkpointed with it, but are not the model.
    `compiled` runs the training forward through torch.compile. `mixed_precision` (bf16 autocast)
    and `channels_last` default to on for CUDA and off for the CPU.

    `on_epoch(epoch, metrics)` is called once per epoch in order, also for the epochs restored
    from a checkpoint, so a logger sees the same sequence whether or not the run was resumed.
    """
    from tqdm import tqdm

    rank, world = distributed()
    extra = extra or nn.Module()
    place = _Placement.of(model, extra, data, world, compiled, mixed_precision, channels_last)
    opt = make_optimizer([*model.parameters(), *extra.parameters()], cfg)
    history: list[dict[str, float]] = []
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history = list(state["history"])
        if rank == 0:
            print(f"{name}: resuming after epoch {len(history)}/{cfg.epochs} from {checkpoint.path}",
                  flush=True)
    for epoch, metrics in enumerate(history):
        if on_epoch and rank == 0:
            on_epoch(epoch, metrics)

    n = len(data.y)
    steps = -(-n // cfg.batch_size)
    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        extra.train()
        order, drawn = epoch_draws(n, seed, epoch, data.slots)
        # a bar on a terminal only (disable=None); logs get the one line per epoch below
        with tqdm(total=steps, desc=f"{name} epoch {epoch + 1}", unit="step", leave=False,
                  disable=None if rank == 0 else True) as progress:
            sums = _epoch(place, loss_fn, opt, extra, data, order, drawn, cfg.batch_size, epoch, rank, world,
                          progress)
        correct = sums.pop("correct")
        if not all(np.isfinite(v) for v in sums.values()):
            raise TrainingError(f"{name}: the loss became non-finite in epoch {epoch + 1} (learning rate "
                                f"{lr:g}); lower the learning rate")
        metrics = {f"train/{k}": v / n for k, v in sums.items()} | {"train/acc": correct / n, "lr": lr}
        if val is not None:
            val_logits = predict(model, val[0])
            metrics["val/acc"] = (val_logits.argmax(1) == val[1]).float().mean().item()
            metrics["val/nll"] = F.cross_entropy(val_logits, val[1]).item()
        history.append(metrics)
        if rank == 0:
            checkpoint.save(model=model.state_dict(), extra=extra.state_dict(), optimizer=opt.state_dict(),
                            rng=torch.get_rng_state(), history=history)
            if on_epoch:
                on_epoch(epoch, metrics)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{name} epoch {epoch + 1}/{cfg.epochs} {shown} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
    model.cpu()
    extra.cpu()
    return history
