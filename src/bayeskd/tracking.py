"""Run tracking: per-epoch curves through DVCLive and, live, in MLflow; one MLflow run per execution of
the pipeline.

An execution (`dvc repro`, `dvc exp run`, a queued experiment, a Prefect flow run) is one MLflow
run across the processes of its stages. The first stage that tracks starts it, with every
parameter: a training stage, or export_onnx where neither trained in this execution (DVC restored
them from its run cache, which the run then says). The training stages log each epoch as it ends;
export_onnx adds the test metrics, reports/ and dvclive/ as artifacts and the ONNX student, which
it registers only for runs of the register branch. The run's id is kept in RUN_FILE (ignored by git
and DVC), with the execution it belongs to: the DVC process that runs the stages, or
BAYESKD_EXECUTION where a caller runs each stage with its own `dvc repro` (the Prefect flow).

Status: RUNNING while a stage works in it and FINISHED when the stage ends (the next stage of the
execution resumes it); FAILED when a stage of the execution fails, KILLED when one is stopped by a
signal. A stage killed outright (SIGKILL) cannot say so: the next execution in that directory marks
its run KILLED.

The default store is `mlflow.db` (SQLite) in the project root, also when DVC runs an experiment in a
temporary directory; MLFLOW_TRACKING_URI overrides it. Tracking never fails a stage: an error is
reported once on stderr, and the run, if started, is marked FAILED.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
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
RUN_FILE = ".bayeskd/mlflow-run.json"  # this directory's execution and its run (see execution_id)
RESTORED_TAG = "bayeskd.restored"  # the roles whose training stage did not run in the execution
# MLflow 3's UI opens every experiment on its GenAI view (traces) unless the page's address asks for
# the model-training view (or the browser has stored that choice); the links printed here ask for it.
UI_VIEW = "workflowType=machine_learning"
# MLflow UIs that choose the view per experiment read this tag (3.x's reads only the address).
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


def register_branch() -> str:
    """The branch whose runs register their student: BAYESKD_REGISTER_BRANCH, default main. The
    model alias that points at its newest student has its name (see `alias`)."""
    return os.environ.get("BAYESKD_REGISTER_BRANCH") or "main"


def alias(branch: str) -> str:
    """The model alias of a branch: its name, with characters MLflow refuses in aliases as `-`."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", branch)


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def branch_of(commit: str) -> str:
    """The branch an execution runs on: the checked-out one; for an experiment (DVC runs those on a
    detached HEAD, in the project or a copy of it) the project's branch whose tip is the baseline
    commit, else one that contains it; the register branch where several do."""
    here = _git("symbolic-ref", "--short", "-q", "HEAD")
    if here or not commit:
        return here
    for how in ("--points-at", "--contains"):
        names = _git("for-each-ref", "--format=%(refname:short)", f"{how}={commit}", "refs/heads",
                     cwd=project_root()).split()
        if names:
            return register_branch() if register_branch() in names else names[0]
    return ""


def execution_id() -> str:
    """The pipeline execution this process belongs to: BAYESKD_EXECUTION where the caller sets it
    (the Prefect flow runs each stage with its own `dvc repro`), else the DVC process that runs the
    stages (`dvc repro`, `dvc exp run`, a queued experiment's executor), else this process."""
    if os.environ.get("BAYESKD_EXECUTION"):
        return os.environ["BAYESKD_EXECUTION"]
    import psutil

    me = psutil.Process()
    for parent in me.parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(arg).name == "dvc" for arg in parent.cmdline()[:3]):
                return f"dvc-{parent.pid}-{parent.create_time()}"
    return f"pid-{me.pid}-{me.create_time()}"


def _run_file() -> dict:
    try:
        return json.loads(Path(RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def end_execution(status: str) -> None:
    """Mark this execution's MLflow run `status` (FAILED, KILLED), where a stage of it started one
    here: for a stage that failed or was stopped, whether or not it tracks."""
    found = _run_file()
    if found.get("execution") != execution_id():
        return
    try:
        import mlflow

        _fail_fast()
        mlflow.MlflowClient(found["tracking_uri"]).set_terminated(found["run_id"], status)
    except Exception as e:  # tracking must never hide the stage's own error
        print(f"warning: MLflow run {found.get('run_id')} not marked {status}: {type(e).__name__}: {e}",
              file=sys.stderr)


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


def _fail_fast() -> None:
    """A tracking server that does not answer costs a stage seconds, not minutes of retries; a
    connection the server dropped between two calls (its keep-alive ended) is retried."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # a busy server may take seconds


def set_experiment(uri: str | None = None):
    """The bayeskd experiment of the store at `uri` (default: tracking_uri()), made active; created
    as a training experiment, not a GenAI one."""
    import mlflow

    _fail_fast()
    # MLflow's own links open its GenAI view; the stage prints one that opens the training view
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri or tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    # made active by id as well: where two processes created it at once, MLflow returns it to the one
    # that lost the race without making it active, and its runs would go to the Default experiment
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
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
    """This execution's MLflow run, as one stage sees it. Every method is safe: failures only warn."""

    def __init__(self, params: dict):
        self.active = True
        self.params = params
        self.commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
        self.exp_name = os.environ.get("DVC_EXP_NAME", "")
        self.branch = branch_of(self.commit)
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # role -> the last epoch the run holds (see log_epoch)

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

    def open(self) -> Run:
        self._safely("starting the run", self._open)
        return self

    def _open(self) -> None:
        """Resume the run of this execution, or start it (marking the run that an execution killed
        outright left RUNNING here as KILLED)."""
        import mlflow

        experiment = set_experiment()
        found, execution = _run_file(), execution_id()
        if found.get("execution") == execution and found.get("tracking_uri") == tracking_uri():
            self.run_id = mlflow.start_run(run_id=found["run_id"]).info.run_id
            return
        if found.get("tracking_uri") == tracking_uri():
            with contextlib.suppress(Exception):  # a run deleted since, or of another store
                client = mlflow.MlflowClient()
                if client.get_run(found["run_id"]).info.status == "RUNNING":
                    client.set_terminated(found["run_id"], "KILLED")
        name = self.exp_name or f"{self.branch or 'HEAD'}@{self.commit[:7]}"
        tags = {"git.commit": self.commit, "git.branch": self.branch, "dvc.experiment": self.exp_name,
                "data.hash": _data_hash()}
        run = mlflow.start_run(run_name=name, tags={k: v for k, v in tags.items() if k != "data.hash" or v})
        self.run_id = run.info.run_id
        self.logged = dict.fromkeys(("teacher", "student"), 0)
        mlflow.log_params(flatten(self.params))
        path = Path(RUN_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": self.run_id, "execution": execution,
                                    "tracking_uri": tracking_uri()}))
        if tracking_uri().startswith(("http://", "https://")):
            print(f"MLflow run {name}, its curves: {tracking_uri().rstrip('/')}/#/experiments/"
                  f"{experiment.experiment_id}/runs/{self.run_id}/model-metrics?{UI_VIEW}", flush=True)

    def log_epoch(self, role: str, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch of a training stage as it ends: `<role>/<key>` at step epoch + 1. Epochs the
        run already holds (a stage retried within its execution replays them) are not logged twice."""
        self._safely(f"logging epoch {epoch + 1} of the {role}", self._log_epoch, role, epoch, metrics)

    def _log_epoch(self, role: str, epoch: int, metrics: dict[str, float]) -> None:
        import mlflow

        if role not in self.logged:  # a resumed run: what did it get before?
            history = mlflow.MlflowClient().get_metric_history(self.run_id, f"{role}/lr")
            self.logged[role] = max((m.step for m in history), default=0)
        if epoch + 1 > self.logged[role]:
            self._log_batch([(f"{role}/{k}", v, epoch + 1) for k, v in metrics.items()])
            self.logged[role] = epoch + 1

    def log_metrics(self, metrics: dict, model_id: str | None = None) -> None:
        """Final metrics (step 0); with `model_id`, as that logged model's metrics too."""
        self._safely("logging metrics", self._log_batch,
                     [(k, v, 0) for k, v in flatten(metrics).items()], model_id)

    def log_restored_curves(self, directories: dict[str, str | Path]) -> list[str]:
        """The curves of each role ({role: its DVCLive directory}) whose training stage did not run in
        this execution (DVC restored its outputs from its cache), read from its files; the run says
        which, in tag RESTORED_TAG and its description. Returns those roles."""
        return self._safely("logging restored curves", self._log_restored_curves, directories) or []

    def _log_restored_curves(self, directories: dict[str, str | Path]) -> list[str]:
        import mlflow

        client = mlflow.MlflowClient()
        have = client.get_run(self.run_id).data.metrics
        restored = [role for role in directories if not any(k.startswith(f"{role}/") for k in have)]
        for role in restored:
            self._log_batch(read_curves(directories[role], role))
        if restored:
            client.set_tag(self.run_id, RESTORED_TAG, ",".join(restored))
            client.set_tag(self.run_id, "mlflow.note.content", (
                f"Not trained in this execution: {' and '.join(restored)}. DVC restored "
                f"{'them' if len(restored) > 1 else 'it'} from its cache (an earlier execution with the "
                "same code, data and parameters trained it); the curves are that training's."))
        return restored

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
        """Log the ONNX file as the run's MLflow model with `metrics` (its own, linked to it). For a
        run of the register branch (see `registers`) also register it, with tags that tell its
        version apart, and point the branch's alias at it. Returns the version, if registered."""
        return self._safely("logging the ONNX model", self._register_onnx, path, example, metrics)

    def _register_onnx(self, path: str, example: np.ndarray, metrics: dict) -> str | None:
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
        if not self.registers():
            return None
        flat = flatten(self.params)
        tags = {k: flat[k] for k in VERSION_TAGS if k in flat} | {
            "dvc.experiment": self.exp_name or "none", "git.commit": self.commit, "git.branch": self.branch}
        version = mlflow.register_model(info.model_uri, MODEL_NAME, tags=tags).version
        client = mlflow.MlflowClient()
        client.update_model_version(MODEL_NAME, version, description=(
            f"{flat.get('teacher.loss')} teacher, seed {flat.get('seed')}: {flat.get('teacher.net')} -> "
            f"{flat.get('student.net')} ({flat.get('student.method')}) on {flat.get('data.name')}; "
            f"{self.exp_name or 'no DVC experiment'}, commit {self.commit[:7]}"))
        client.set_registered_model_alias(MODEL_NAME, alias(register_branch()), version)
        return str(version)

    def registers(self) -> bool:
        """A run of the register branch: `dvc repro` on a checkout of it (outside DVC experiments,
        with whatever parameters will be committed), or an experiment at its tip with the parameters
        committed there, which is what the nightly deployment runs. Experiments with other
        parameters (`-S`, the comparison's variants other than the branch's own) are not."""
        import yaml

        branch, root = register_branch(), project_root()
        if not self.exp_name:
            return _git("symbolic-ref", "--short", "-q", "HEAD") == branch
        tips = {_git("rev-parse", "--verify", "-q", ref, cwd=root) for ref in (branch, f"origin/{branch}")}
        if not self.commit or self.commit not in tips - {""}:
            return False
        return yaml.safe_load(_git("show", f"{self.commit}:params.yaml", cwd=root) or "null") == self.params

    def close(self, status: str, final: bool) -> None:
        """End the stage's part of the run with `status` (FAILED if tracking failed on the way);
        `final` (the last stage) forgets the run, so that the next execution starts its own."""
        import mlflow

        if self.run_id is None:
            return
        with contextlib.suppress(Exception):  # a store that failed once has been reported
            mlflow.end_run(status=status if self.active else "FAILED")
        if final:
            Path(RUN_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def mlflow_run(final: bool = False, params_file: str = "params.yaml") -> Iterator[Run]:
    """This execution's MLflow run for the length of a stage: started, or resumed from an earlier
    stage of the execution. It ends FINISHED, FAILED on an error, KILLED on KeyboardInterrupt;
    `final` is the pipeline's last stage."""
    import yaml

    run = Run(yaml.safe_load(Path(params_file).read_text())).open()
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as e:
        status = "FAILED" if e.code else "FINISHED"
        raise
    finally:
        run.close(status, final)
