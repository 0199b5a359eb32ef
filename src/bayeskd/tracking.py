"""Run tracking: per-epoch curves through DVCLive, and one complete MLflow run per pipeline execution.

The training stages write their curves with DVCLive only. The last stage, export_onnx, writes the
MLflow run in one go from the workspace's files: parameters, the curves (from dvclive/), the test
metrics (reports/metrics.json), reports/ and dvclive/ as artifacts, and the ONNX student as a
registered model. So a run is complete or absent: an execution whose export_onnx does not run (the
student did not change) logs nothing, as its results are those of an earlier execution. The
default store is `mlflow.db` (SQLite) in the project root, also when DVC runs an experiment in a
temporary directory; MLFLOW_TRACKING_URI overrides it. Tracking never fails a stage: an error is
reported once on stderr, and the run, if started, is marked FAILED.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from bayeskd.train import EpochHook

EXPERIMENT = "bayeskd"
MODEL_NAME = "bayeskd-student"
MAIN_ALIAS = "main"  # the newest student built on branch main (see Run._is_main)
# The experiment opens on training runs in the MLflow UI (not on its GenAI traces view).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# Shown as tags of each registered model version, so versions tell themselves apart.
VERSION_TAGS = ("teacher.loss", "seed", "data.name", "teacher.net", "student.net", "student.method")


@contextlib.contextmanager
def dvclive_epochs(directory: str | Path) -> Iterator[EpochHook]:
    """An `on_epoch` hook for `train.fit` writing one DVCLive step per epoch into `directory`.

    The pipeline's dvc.yaml declares the plots itself, so DVCLive neither edits dvc.yaml nor
    creates experiments of its own. DVCLive starts (and clears `directory`) at the first finished
    epoch, so a run that fails in its first epoch leaves the earlier curves as they were.
    """
    from dvclive import Live

    with contextlib.ExitStack() as stack:
        live: Live | None = None

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal live
            if live is None:
                live = stack.enter_context(Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False,
                                                report=None))
            live.step = epoch + 1  # epochs count from 1, as the training log prints them
            for key, value in metrics.items():
                live.log_metric(key, value)
            live.make_summary()

        yield on_epoch


def project_root() -> Path:
    """The DVC project's root: DVC_ROOT points there also for queued and temporary experiments."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else mlflow.db (SQLite) in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _data_hash(directory: str = "data/prepared") -> str:
    from bayeskd.io import sha256_file

    files = sorted(Path(directory).glob("*")) if Path(directory).is_dir() else []
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()[:16]


def set_experiment(uri: str | None = None):
    """The bayeskd experiment of the store at `uri` (default: tracking_uri()), made active; created
    as a training experiment, not a GenAI one."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(uri or tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    if KIND_TAG not in experiment.tags:
        mlflow.set_experiment_tag(KIND_TAG, KIND)
    return experiment


def read_curves(directory: str | Path, prefix: str) -> list[tuple[str, float, int]]:
    """(key, value, step) of every DVCLive curve under `directory`: plots/metrics/train/loss.tsv
    becomes `<prefix>/train/loss`."""
    root = Path(directory) / "plots" / "metrics"
    out = []
    for tsv in sorted(root.rglob("*.tsv")):
        key = f"{prefix}/{tsv.relative_to(root).with_suffix('').as_posix()}"
        with open(tsv, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                out.append((key, float(row[tsv.stem]), int(row["step"])))
    return out


class Run:
    """The MLflow run of one pipeline execution. Every method is safe: failures only warn."""

    def __init__(self, params: dict):
        self.active = True
        self.params = params
        self.commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
        self.exp_name = os.environ.get("DVC_EXP_NAME", "")
        self.run_id: str | None = None

    def _safely(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never cost a stage its outputs
            self.active = False
            print(f"warning: MLflow tracking off for this stage ({what} failed at {tracking_uri()}): "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None

    def start(self) -> Run:
        self._safely("starting the run", self._start)
        return self

    def _start(self) -> None:
        import mlflow

        set_experiment()
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags = {"git.commit": self.commit, "dvc.experiment": self.exp_name, "data.hash": _data_hash(),
                "git.branch": branch}
        run = mlflow.start_run(run_name=self.exp_name or f"{branch or 'HEAD'}@{self.commit[:7]}",
                               tags={k: v for k, v in tags.items() if k != "data.hash" or v})
        self.run_id = run.info.run_id
        mlflow.log_params(flatten(self.params))

    def log_metrics(self, metrics: dict, model_id: str | None = None) -> None:
        """Final metrics (step 0); with `model_id`, as that logged model's metrics too."""
        self._safely("logging metrics", self._log_batch,
                     [(k, v, 0) for k, v in flatten(metrics).items()], model_id)

    def log_curves(self, directory: str | Path, prefix: str) -> None:
        """The DVCLive curves under `directory` as MLflow metric histories `<prefix>/...`."""
        self._safely(f"logging the curves of {directory}", self._log_batch, read_curves(directory, prefix))

    def _log_batch(self, items: list[tuple[str, float, int]], model_id: str | None = None) -> None:
        # the client, not mlflow.log_metrics: that one links every metric of a step at which a
        # model was logged to that model, so the student model would list the teacher's metrics
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step, model_id=model_id) for k, v, step in items]
        client = mlflow.MlflowClient()
        for i in range(0, len(batch), 1000):  # the store's limit per call
            client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifacts(self, *paths: str) -> None:
        import mlflow

        for p in paths:
            log = mlflow.log_artifacts if Path(p).is_dir() else mlflow.log_artifact
            self._safely(f"logging {p}", log, p, Path(p).parent.as_posix() if Path(p).is_file() else p)

    def register_onnx(self, path: str, example: np.ndarray, metrics: dict) -> str | None:
        """Log the ONNX file as an MLflow model with `metrics` (its own, linked to it), register
        it with tags that tell its version apart, and point the `main` alias at it on branch main
        (see `_is_main`). Returns the version."""
        return self._safely("registering the ONNX model", self._register_onnx, path, example, metrics)

    def _register_onnx(self, path: str, example: np.ndarray, metrics: dict) -> str:
        import mlflow
        import onnx
        import onnxruntime as ort
        from mlflow.models import infer_signature

        from bayeskd import integrity

        damage = integrity.onnx_problem(Path(path).read_bytes())
        if damage:
            raise ValueError(f"{path} is damaged ({damage})")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        inputs = {session.get_inputs()[0].name: example}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
        info = mlflow.onnx.log_model(
            onnx.load(path), name="student", signature=infer_signature(inputs, outputs),
            pip_requirements=["onnxruntime"], save_as_external_data=False,
        )
        self._log_batch([(k, v, 0) for k, v in flatten(metrics).items()], model_id=info.model_id)
        flat = flatten(self.params)
        tags = {k: flat[k] for k in VERSION_TAGS if k in flat} | {
            "dvc.experiment": self.exp_name or "none", "git.commit": self.commit}
        version = mlflow.register_model(info.model_uri, MODEL_NAME, tags=tags).version
        client = mlflow.MlflowClient()
        client.update_model_version(MODEL_NAME, version, description=(
            f"{flat.get('teacher.loss')} teacher, seed {flat.get('seed')}: {flat.get('teacher.net')} -> "
            f"{flat.get('student.net')} ({flat.get('student.method')}) on {flat.get('data.name')}; "
            f"{self.exp_name or 'no DVC experiment'}, commit {self.commit[:7]}"))
        if self._is_main():
            client.set_registered_model_alias(MODEL_NAME, MAIN_ALIAS, version)
        return str(version)

    def _is_main(self) -> bool:
        """A run of branch main: `dvc repro` on a checkout of main (outside experiments), or any run
        at the tip of main with the parameters committed there (the nightly flow, which runs as an
        experiment on a detached checkout). Runs with overrides never are."""
        import yaml

        if _git("rev-parse", "--abbrev-ref", "HEAD") == "main" and not self.exp_name:
            return True
        tips = {_git("rev-parse", "--verify", "-q", ref) for ref in ("main", "origin/main")} - {""}
        if not self.commit or self.commit not in tips:
            return False
        return yaml.safe_load(_git("show", f"{self.commit}:params.yaml") or "null") == self.params

    def end(self) -> None:
        import mlflow

        if self.run_id is None:
            return
        status = "FINISHED" if self.active else "FAILED"
        with contextlib.suppress(Exception):  # a store that failed once has been reported
            mlflow.end_run(status=status)


@contextlib.contextmanager
def mlflow_run(params_file: str = "params.yaml") -> Iterator[Run]:
    """A new MLflow run for this pipeline execution, with all parameters logged."""
    import yaml

    run = Run(yaml.safe_load(Path(params_file).read_text())).start()
    try:
        yield run
    finally:
        run.end()
