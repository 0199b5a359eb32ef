"""The one training loop, used for teachers and students alike.

SGD with momentum and a step schedule. After every epoch the loop writes a checkpoint (weights,
optimizer state, metric history, and a fingerprint of what is being trained); a rerun with the same
fingerprint resumes from it. Batch order is drawn from a generator seeded by (seed, epoch), so a
resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.config import Optim
from bayeskd.io import atomic_path

# loss_fn(logits, targets, sample_indices, epoch) -> named loss terms, summed for the gradient
LossFn = Callable[[Tensor, Tensor, Tensor, int], dict[str, Tensor]]
EpochHook = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def lr_at(cfg: Optim, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: lr * gamma^(number of milestones already passed)."""
    return cfg.lr * cfg.gamma ** sum(m <= epoch for m in cfg.milestones)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(n, generator=g)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Logits of `model` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    ckpt = torch.load(path, weights_only=True)
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
) -> list[dict[str, float]]:
    """Train `model` in place for cfg.epochs epochs; return the per-epoch metrics.

    `on_epoch(epoch, metrics)` is called once per epoch in order, also for the epochs restored
    from a checkpoint, so a logger sees the same sequence whether or not the run was resumed.
    """
    checkpoint = Path(checkpoint)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    ckpt = _load_checkpoint(checkpoint, fingerprint)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        print(f"{name}: resuming after epoch {len(history)}/{cfg.epochs} from {checkpoint}", flush=True)
    for epoch, metrics in enumerate(history):
        if on_epoch:
            on_epoch(epoch, metrics)

    n = len(y)
    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, float] = {}
        correct = 0
        for idx in epoch_order(n, seed, epoch).split(cfg.batch_size):
            logits = model(x[idx])
            terms = loss_fn(logits, y[idx], idx, epoch)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (terms | {"loss": loss}).items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        if not all(np.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"{name}: the loss became non-finite in epoch {epoch + 1}; "
                                     f"lower the learning rate (now {lr})")
        metrics = {f"train/{k}": v / n for k, v in sums.items()} | {"train/acc": correct / n, "lr": lr}
        if val is not None:
            val_logits = predict(model, val[0])
            metrics["val/acc"] = (val_logits.argmax(1) == val[1]).float().mean().item()
            metrics["val/nll"] = F.cross_entropy(val_logits, val[1]).item()
        history.append(metrics)
        with atomic_path(checkpoint) as tmp:
            torch.save({"fingerprint": fingerprint, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "history": history}, tmp)
        if on_epoch:
            on_epoch(epoch, metrics)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{name} epoch {epoch + 1}/{cfg.epochs} {shown} ({time.perf_counter() - start:.1f}s)",
              flush=True)
    return history
