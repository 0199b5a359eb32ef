"""Per-epoch metric logging through DVCLive, so `dvc plots show` draws the training curves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bayeskd.train import EpochHook


@contextlib.contextmanager
def dvclive_epochs(directory: str | Path) -> Iterator[EpochHook]:
    """An `on_epoch` hook for `train.fit` writing one DVCLive step per epoch into `directory`.

    The pipeline's dvc.yaml declares the plots itself, so DVCLive neither edits dvc.yaml nor
    creates experiments of its own.
    """
    from dvclive import Live

    with Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, report=None) as live:

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            live.step = epoch
            for key, value in metrics.items():
                live.log_metric(key, value)
            live.make_summary()

        yield on_epoch
