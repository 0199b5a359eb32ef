"""The one training loop, used for teachers and students alike.

`fit` reads top to bottom: place the model and data (`Placement`), restore the last checkpoint if
it belongs to this run, then one epoch after another: the epoch's draws, this process's batches
(`Placement.batches`), one `train_step` per batch with its sums kept on the device (`Tally`), then
the epoch's totals, a checkpoint and a log line. A step can be run on its own, apart from the
once-per-epoch bookkeeping (tests/test_device.py runs one of every path on a stand-in device).

SGD with momentum and a step schedule (`make_optimizer`, `lr_at`). After every epoch the loop writes a
checkpoint (weights, optimizer state, metric history, the RNG state, and a fingerprint of what is
being trained); a rerun with the same fingerprint resumes from it. Each epoch draws, from one
generator seeded by (seed, epoch), first the batch order and then one augmentation view per sample,
so a resumed run is bit-identical to an uninterrupted one on CPU, and a student reading teacher
logits from a cache of all views sees exactly the views, hence the supervision, of an online run
with the same seed.

Devices (bayeskd.placement): the run's device holds the model and, when it fits in half the free
memory, the training set; bf16 autocast and channels_last for images are arguments
(`mixed_precision`, `channels_last`, on by default for CUDA only), so their logic also runs, and is
tested, on the CPU. The host waits for the device once per epoch, when it reads the epoch's sums:
the epoch's order, view slots and sample indices move to the device once, each batch is gathered
there (or, for a training set kept in host memory, copied without waiting from a pinned buffer
that holds the epoch's samples in order), and nothing in a step reads a value back. With
torch.compile, only batches of the full size run compiled; a smaller last batch runs eagerly, so
compiling never sees a second shape.

Several processes: under torchrun the same loop runs data-parallel (DDP; gloo on CPUs, NCCL on
GPUs). Every rank draws the same global batch of `batch_size` samples and takes its own contiguous
part of it (parts differ by at most one sample); DDP averages the gradients, so a step equals a
single process's step on the whole batch and the learning rate stays as it is. A last global batch
with fewer samples than processes is dropped (those samples come again in the next epoch's order),
so no process gets an empty part. Validation runs on rank 0 alone. On GPUs, batch norm is
synchronised across the processes (SyncBatchNorm); gloo has no SyncBatchNorm, so CPU processes
normalise with their own part. The process group is destroyed when the process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bayeskd import placement
from bayeskd.augment import CropFlip
from bayeskd.batch import Batch, EpochHook, LossFn
from bayeskd.config import Optim
from bayeskd.io import Failure, atomic_path


class TrainingError(Failure):
    """Training cannot go on (a non-finite loss, fewer samples than processes); the message says what
    to change."""


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
    """Seed torch and ask for deterministic algorithms: on the CPU runs then repeat bit for bit. On a
    GPU the training paths have deterministic kernels only (pooling as means, see bayeskd.methods);
    an op without one (adaptive pooling of maps whose sizes do not divide) warns instead of stopping
    the run, and a repeated seed then agrees within what benchmarks/gpu_check.py measures."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPUs
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join_process_group(device: torch.device) -> None:
    """Under torchrun, join the process group once (NCCL on GPUs, gloo on CPUs); it is destroyed
    when the process ends."""
    if distributed()[1] > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)


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


def epoch_steps(order: Tensor, batch_size: int, rank: int, world: int) -> list[Tensor]:
    """This rank's part of each global batch of `order`, in order: contiguous parts that differ by
    at most one sample; a last batch with fewer samples than processes is dropped, so no part is
    empty (with one process nothing is dropped)."""
    return [step.tensor_split(world)[rank] for step in order.split(batch_size) if len(step) >= world]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 4096, device: torch.device | str | None = None
            ) -> Tensor:
    """Logits of `model` in eval mode and float32, in batches on `device` (the model's own when not
    given; the model moves there); returned on the CPU after one wait for the device."""
    device = next(model.parameters()).device if device is None else placement.choose(device)
    model.eval().to(device)
    return torch.cat([model(x[i : i + batch_size].to(device, non_blocking=True)).float()
                      for i in range(0, len(x), batch_size)]).cpu()


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
class Placement:
    """Where a run trains: the model on its device (wrapped for DDP and torch.compile as asked), the
    training data where the steps read it, the forward's autocast. Made once per run."""

    net: nn.Module  # the model as a batch of the full size runs it (DDP, torch.compile)
    eager: nn.Module  # as a batch of another size runs it: not compiled
    full: int  # this rank's samples in a full batch
    batch_size: int  # the global batch
    device: torch.device
    data: TrainSet  # labels and view table on the device; inputs there too, unless `pinned`
    mixed_precision: bool
    rank: int = 0
    world: int = 1
    pinned: Tensor | None = None  # inputs kept in host memory: the epoch's, gathered in order

    @classmethod
    def of(cls, model: nn.Module, extra: nn.Module, data: TrainSet, device: torch.device, batch_size: int,
           rank: int = 0, world: int = 1, compiled: bool = False, mixed_precision: bool | None = None,
           channels_last: bool | None = None, resident: bool | None = None) -> Placement:
        """`resident`: the inputs on the device (default: when they take under half its free memory)."""
        if min(batch_size, len(data.y)) < world:
            raise TrainingError(f"a batch of {batch_size} and {len(data.y)} training samples for "
                                f"compute.processes = {world}: each process needs a part of every batch; "
                                "use fewer processes")
        cuda = device.type == "cuda"
        mixed_precision = cuda if mixed_precision is None else mixed_precision
        channels_last = cuda if channels_last is None else channels_last
        model.to(device, memory_format=placement.image_layout(data.x, channels_last))
        extra.to(device)
        resident = placement.fits(data.x.nbytes, device) if resident is None else resident
        pinned = None
        if not resident:  # for this rank's samples of an epoch: the same count every epoch
            mine = sum(map(len, epoch_steps(torch.arange(len(data.y)), batch_size, rank, world)))
            pinned = torch.empty((mine, *data.x.shape[1:]), dtype=data.x.dtype, pin_memory=cuda)
        table = None if data.view_table is None else data.view_table.to(device)
        placed = TrainSet(data.x.to(device) if resident else data.x, data.y.to(device), data.augment, table)
        if world > 1 and cuda:  # batch-norm statistics of the global batch, as one process has them
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root (no net is a bare BN)
        eager = model if world == 1 else DistributedDataParallel(model,
                                                                 device_ids=[device.index] if cuda else None)
        first = min(batch_size, len(data.y))
        full = first // world + (rank < first % world)
        return cls(torch.compile(eager) if compiled else eager, eager, full, batch_size, device, placed,
                   mixed_precision, rank, world, pinned)

    def autocast(self) -> contextlib.AbstractContextManager:
        return placement.autocast(self.device, self.mixed_precision)

    def batches(self, order: Tensor, drawn: Tensor | None) -> Iterator[Batch]:
        """This rank's batches of an epoch, from its order and drawn view slots (made on the CPU):
        its sample indices and slots move to the device in one copy each; each batch is gathered
        on the device, or copied without waiting from the pinned buffer of the epoch's inputs."""
        parts = epoch_steps(order, self.batch_size, self.rank, self.world)
        mine = torch.cat(parts)  # this rank's samples in the order it trains on them
        indices = mine.to(self.device)
        host_slots = None if drawn is None else drawn[mine]
        slots = None if host_slots is None else host_slots.to(self.device)
        if self.pinned is not None:
            torch.index_select(self.data.x, 0, mine, out=self.pinned[: len(mine)])
        d, start = self.data, 0
        for part in parts:
            stop = start + len(part)
            idx = indices[start:stop]
            x = d.x[idx] if self.pinned is None else self.pinned[start:stop].to(self.device,
                                                                                non_blocking=True)
            batch = Batch(x, d.y[idx], idx, host_idx=mine[start:stop])
            if d.augment is not None:
                batch.slots, batch.host_slots = slots[start:stop], host_slots[start:stop]
                batch.views = batch.slots if d.view_table is None else d.view_table[idx, batch.slots]
                batch.x = d.augment.apply(batch.x, batch.views)
            yield batch
            start = stop


def train_step(place: Placement, loss_fn: LossFn, opt: torch.optim.Optimizer, extra: nn.Module, batch: Batch,
               epoch: int) -> tuple[dict[str, Tensor], Tensor]:
    """One optimizer step on `batch`: the forward under the run's autocast, the loss terms, backward,
    the step. Returns the detached terms with their sum ("loss"), and the logits, on the device:
    nothing here waits for the device."""
    net = place.net if len(batch.y) == place.full else place.eager
    with place.autocast():
        logits = net(batch.x)
        terms = loss_fn(logits, batch, epoch)
        loss = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if place.world > 1:  # DDP averages the model's gradients; the extra parts' the same way
        for p in extra.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= place.world
    opt.step()
    return {k: v.detach() for k, v in (terms | {"loss": loss}).items()}, logits.detach()


class Tally:
    """An epoch's sums of the loss terms (each step's weighted by its samples) and its count of
    correct predictions, kept on the device."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, terms: dict[str, Tensor], logits: Tensor, batch: Batch) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v.double() * len(batch.y)
        self.correct += (logits.argmax(1) == batch.y).sum()

    def totals(self, world: int) -> dict[str, float]:
        """The sums over all ranks, read on the host: the epoch's one wait for the device."""
        totals = torch.stack([*self.sums.values(), self.correct.double()])
        if world > 1:
            dist.all_reduce(totals)
        *values, right = totals.tolist()
        return dict(zip(self.sums, values, strict=True)) | {"correct": right}


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
    device: torch.device | str = "auto",
    name: str = "model",
) -> list[dict[str, float]]:
    """Train `model` in place for cfg.epochs epochs on `device` (bayeskd.placement); return the
    per-epoch metrics. The model ends on the CPU.

    `extra` holds trainable parts that belong to the loss (a distillation method's connectors, heads,
    memory banks): they train with the model and are checkpointed with it, but are not the model.
    `compiled` runs the training forward through torch.compile. `mixed_precision` (bf16 autocast)
    and `channels_last` default to on for CUDA and off for the CPU.

    `on_epoch(epoch, metrics)` is called once per epoch in order, also for the epochs restored
    from a checkpoint, so a logger sees the same sequence whether or not the run was resumed.
    """
    from tqdm import tqdm

    device = placement.choose(device)
    rank, world = distributed()
    join_process_group(device)
    extra = extra or nn.Module()
    place = Placement.of(model, extra, data, device, cfg.batch_size, rank, world, compiled, mixed_precision,
                         channels_last)
    opt = make_optimizer([*model.parameters(), *extra.parameters()], cfg)
    history: list[dict[str, float]] = []
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
        placement.set_rng_state(state["rng"], device)
        history = list(state["history"])
        if rank == 0:
            print(f"{name}: resuming after epoch {len(history)}/{cfg.epochs} from {checkpoint.path}",
                  flush=True)
    for epoch, metrics in enumerate(history):
        if on_epoch and rank == 0:
            on_epoch(epoch, metrics)

    n = len(data.y)
    sizes = [len(step) for step in torch.arange(n).split(cfg.batch_size) if len(step) >= world]
    trained = sum(sizes)  # the samples of an epoch, over all ranks
    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        extra.train()
        order, drawn = epoch_draws(n, seed, epoch, data.slots)
        tally = Tally(device)
        # a bar on a terminal only (disable=None); logs get the one line per epoch below
        with tqdm(total=len(sizes), desc=f"{name} epoch {epoch + 1}", unit="step", leave=False,
                  disable=None if rank == 0 else True) as progress:
            for batch in place.batches(order, drawn):
                tally.add(*train_step(place, loss_fn, opt, extra, batch, epoch), batch)
                progress.update(1)
        sums = tally.totals(world)
        correct = sums.pop("correct")
        if not all(np.isfinite(v) for v in sums.values()):
            raise TrainingError(f"{name}: the loss became non-finite in epoch {epoch + 1} (learning rate "
                                f"{lr:g}); lower the learning rate")
        metrics = {f"train/{k}": v / trained for k, v in sums.items()} | {"train/acc": correct / trained,
                                                                            "lr": lr}
        if val is not None and rank == 0:
            val_logits = predict(model, val[0], device=device)
            metrics["val/acc"] = (val_logits.argmax(1) == val[1]).float().mean().item()
            metrics["val/nll"] = F.cross_entropy(val_logits, val[1]).item()
        history.append(metrics)
        if rank == 0:
            checkpoint.save(model=model.state_dict(), extra=extra.state_dict(), optimizer=opt.state_dict(),
                            rng=placement.rng_state(device), history=history)
            if on_epoch:
                on_epoch(epoch, metrics)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{name} epoch {epoch + 1}/{cfg.epochs} {shown} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
    model.cpu()
    extra.cpu()
    return history
