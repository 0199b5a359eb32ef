"""What every stage script shares: parameter loading, clean failures, nets and tensors."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

import bayeskd
from bayeskd import config, nets, runs
from bayeskd.augment import CropFlip
from bayeskd.batch import EpochHook
from bayeskd.data import Dataset
from bayeskd.io import Failure, sha256_file
from bayeskd.tracking import dvclive_epochs, end_execution, mlflow_run
from bayeskd.train import distributed

DATA = "data/prepared"
TEACHER = "models/teacher.safetensors"
STUDENT = "models/student.safetensors"
CACHE = "cache/teacher_logits"


def fail(message: str, code: int = 2) -> NoReturn:
    """End the stage with one `error:` line and exit code 2, as for bad parameters."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def stage(main: Callable[[], None]) -> None:
    """Run a stage's main. What a user can meet and fix (a damaged or missing input, a full disk, a
    read-only output, a loss that diverged) ends the stage with one `error:` line, not a traceback;
    outputs are written atomically, so the old ones are untouched. Under DVC, a stage fails if
    params.yaml changed while it ran (bayeskd.runs). A stage that fails, or is stopped by SIGINT or
    SIGTERM, marks the pipeline execution's MLflow run FAILED or KILLED."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stopped)
    started_with = runs.params_digest()
    try:
        try:
            main()
            if runs.under_dvc() and (why := runs.changed_while_running(started_with)):
                fail(why)
        except Failure as e:
            fail(str(e))
        except OSError as e:
            fail(f"cannot read {e.filename or 'an input'}: {e.strerror or e}")
    except BaseException as e:
        if not (isinstance(e, SystemExit) and not e.code):
            end_execution("FAILED")
        raise
    finally:
        # The interpreter's teardown of the ~4,500 modules a stage imports would run the cyclic
        # garbage collector over the whole heap again and again: about 2 s per stage. Frozen, the
        # heap is freed with the process; atexit handlers still run.
        gc.freeze()


def _stopped(signum: int, frame: object) -> None:
    """The execution's MLflow run is KILLED; then the stage ends by the signal, as it would have."""
    end_execution("KILLED")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def params() -> config.Params:
    """params.yaml, validated; under DVC, the one check_params validated for this run (bayeskd.runs).
    torch then uses compute.threads CPU threads, whatever OMP_NUM_THREADS says: a CPU computation
    rounds differently at another thread count, so the count is a parameter."""
    p, digest = config.load_digest_or_exit()
    if runs.under_dvc() and (why := runs.problem(digest)):
        fail(why)
    torch.set_num_threads(p.compute.threads)
    return p


def build(role: str, net: str, ds: Dataset) -> nn.Module:
    """The net named by `<role>.net`, sized for the dataset. A net that cannot take the data's
    inputs is a parameter error, found by one forward pass before any training."""
    try:
        model = nets.build(net, ds.num_classes, ds.in_shape, ds.info.get("normalize"))
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *ds.in_shape))
        if out.shape != (2, ds.num_classes):
            raise ValueError(f"it gives outputs of shape {tuple(out.shape[1:])}, not ({ds.num_classes},)")
    except (ValueError, RuntimeError) as e:
        fail(f"{role}.net = {net!r} does not fit dataset {ds.name!r} (inputs {ds.in_shape}): {e}")
    return model.train()


def load_teacher(net: str, ds: Dataset) -> nn.Module:
    """The trained teacher, in eval mode (WeightsError if its file is damaged)."""
    return nets.load_weights(build("teacher", net, ds), TEACHER)


def augmentation(p: config.Params) -> CropFlip | None:
    """The training views: None when data.augment.padding is 0."""
    return CropFlip(p.data.augment.padding) if p.data.augment.padding else None


def tensors(ds: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs and labels of a split; None for a split the dataset does not have (an empty val)."""
    if split not in ds.splits:
        return None
    s = ds.splits[split]
    return torch.from_numpy(s.x), torch.from_numpy(s.y)


@contextlib.contextmanager
def epoch_logging(role: str) -> Iterator[EpochHook | None]:
    """The per-epoch hook of a training stage: DVCLive curves, and the same, live, in the pipeline
    execution's MLflow run (which the first training stage of the execution starts). Under torchrun
    only rank 0 logs (and writes the outputs)."""
    if distributed()[0] != 0:
        yield None
        return
    with dvclive_epochs(f"dvclive/{role}") as live, mlflow_run() as run:

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            live(epoch, metrics)
            run.log_epoch(role, epoch, metrics)

        yield on_epoch


def finish(model: nn.Module, history: list[dict], weights: str, checkpoint: str, what: str,
           metadata: dict[str, str] | None = None) -> None:
    """The end of a training stage, on rank 0: the weights (with `metadata` in their header), the
    checkpoint gone (only a killed run needs it), a one-line summary."""
    if distributed()[0] != 0:
        return
    nets.save_weights(model, weights, metadata)
    Path(checkpoint).unlink()
    shown = " ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k.endswith("acc"))
    print(f"{what} done: {shown} -> {weights}")


def fingerprint(*parts: object, files: tuple[str, ...] = ()) -> str:
    """Identity of a training run: its parameters, input files and the library's code."""
    code = sorted(Path(bayeskd.__file__).parent.rglob("*.py"))
    blob = json.dumps([parts, [sha256_file(f) for f in (*files, *code)]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
