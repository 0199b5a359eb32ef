"""Run tracking: per-epoch curves through DVCLive, and one MLflow run per pipeline execution.

Each stage that runs logs into the MLflow run of its pipeline execution, found by a key made of the
git commit, the DVC experiment name and the contents of params.yaml (so the stages of one
`dvc repro` or `dvc exp run` share a run). The default store is `mlflow.db` (SQLite) in the project
root, also when DVC runs an experiment in a temporary directory; MLFLOW_TRACKING_URI overrides it.
Tracking never fails a stage: an error is reported once on stderr and tracking stops there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bayeskd.train import EpochHook

EXPERIMENT = "bayeskd"
MODEL_NAME = "bayeskd-student"
MAIN_ALIAS = "main"  # the registered student of the latest run on the main branch


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
            live.step = epoch
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


class Run:
    """The MLflow run of this pipeline execution. Every method is safe: failures only warn."""

    def __init__(self, params: dict, params_text: str):
        self.active = True
        self.params = params
        self.commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
        self.exp_name = os.environ.get("DVC_EXP_NAME", "")
        self.key = hashlib.sha256(f"{self.commit}\n{self.exp_name}\n{params_text}".encode()).hexdigest()
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

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        mlflow.set_tracking_uri(tracking_uri())
        experiment = mlflow.set_experiment(EXPERIMENT)
        found = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                                   filter_string=f"tags.`bayeskd.run_key` = '{self.key}'")
        tags = {"bayeskd.run_key": self.key, "git.commit": self.commit,
                "dvc.experiment": self.exp_name, "data.hash": _data_hash(),
                "git.branch": _git("rev-parse", "--abbrev-ref", "HEAD")}
        run = mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(
            run_name=self.exp_name or None, tags=tags)
        self.run_id = run.info.run_id
        mlflow.set_tags({k: v for k, v in tags.items() if k != "data.hash" or v})
        mlflow.log_params(flatten(self.params))

    def epoch_hook(self, prefix: str) -> EpochHook:
        """Logs each epoch's metrics once: a resumed run replays its restored epochs, which an
        earlier attempt of this pipeline execution has already logged into this run."""
        import mlflow

        logged = self._safely("reading the run", self._logged_epochs, f"{prefix}/lr") or set()

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if epoch not in logged:
                self._safely("logging metrics", mlflow.log_metrics,
                             {f"{prefix}/{k}": v for k, v in metrics.items()}, step=epoch)
        return on_epoch

    def _logged_epochs(self, key: str) -> set[int]:
        import mlflow

        return {m.step for m in mlflow.MlflowClient().get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: dict) -> None:
        import mlflow

        self._safely("logging metrics", mlflow.log_metrics, flatten(metrics))

    def log_artifacts(self, *paths: str) -> None:
        import mlflow

        for p in paths:
            log = mlflow.log_artifacts if Path(p).is_dir() else mlflow.log_artifact
            self._safely(f"logging {p}", log, p, Path(p).parent.as_posix() if Path(p).is_file() else p)

    def register_onnx(self, path: str, example) -> str | None:
        """Log the ONNX file as an MLflow model, register it, and on the main branch outside
        experiments point the `main` alias at the new version. Returns the version."""
        return self._safely("registering the ONNX model", self._register_onnx, path, example)

    def _register_onnx(self, path: str, example) -> str:
        import mlflow
        import onnx
        from mlflow.models import infer_signature

        info = mlflow.onnx.log_model(
            onnx.load(path), name="student", registered_model_name=MODEL_NAME,
            signature=infer_signature(example), pip_requirements=["onnxruntime"],
            save_as_external_data=False,
        )
        version = str(info.registered_model_version)
        if _git("rev-parse", "--abbrev-ref", "HEAD") == "main" and not self.exp_name:
            mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, MAIN_ALIAS, version)
        return version

    def end(self) -> None:
        import mlflow

        self._safely("ending the run", mlflow.end_run)


@contextlib.contextmanager
def mlflow_run(params_file: str = "params.yaml") -> Iterator[Run]:
    """The MLflow run of this pipeline execution, with all parameters logged."""
    import yaml

    text = Path(params_file).read_text()
    run = Run(yaml.safe_load(text), text).start()
    try:
        yield run
    finally:
        run.end()
