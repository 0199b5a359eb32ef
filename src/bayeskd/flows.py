"""Prefect orchestration: the DVC pipeline as a flow (one task per stage) and the CE-vs-MSE comparison.

A pipeline flow run never touches the user's working tree. It works in its own workspace, a git
clone of the project at a fixed commit under `.bayeskd/workspaces/<variant>/` (variant = commit +
parameter overrides), held with an exclusive lock, so two flow runs on one machine never share a DVC
workspace. It sets the overrides in the workspace's params.yaml (validated before any stage runs),
runs each stage with `dvc repro --single-item`, saves the result with `dvc exp save` and pushes the
experiment to the project's git remote (`dvc exp push`, which also sends the outputs to the DVC
remote, where the project has one). Before the first stage it checks the workspace's files and the
DVC cache's copies of the outputs dvc.lock names (`bayeskd.integrity.verify`), as DVC would restore
a damaged copy unseen. The workspace shares the project's DVC cache and is deleted after success; a
failed or killed run leaves it, with its per-epoch checkpoints, and the next run of the same variant
resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from bayeskd import config, integrity, report, tracking
from bayeskd.io import run as _sh
from bayeskd.io import write_text

WORKSPACES = ".bayeskd/workspaces"
DVC = [sys.executable, "-m", "dvc"]
Loss = Literal[config.TEACHER_LOSSES]


def stage_names(repo: Path) -> list[str]:
    """The stages in the order dvc.yaml lists them (which is the pipeline's order)."""
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def git_origin(repo: Path) -> str | None:
    """The project's git remote `origin`, where experiments go; None if it has none."""
    try:
        return _sh(["git", "remote", "get-url", "origin"], repo)
    except RuntimeError:
        return None


class StageFailed(RuntimeError):
    def __init__(self, stage: str, exit_code: int | None, output: str):
        self.stage, self.exit_code = stage, exit_code
        super().__init__(f"stage {stage} failed (exit code {exit_code}):\n{output}")

    @property
    def transient(self) -> bool:
        """Killed by a signal, or DVC itself failed (a lock, I/O): worth a retry. A stage that
        exits with an error of its own (bad input, a bug) fails the same way again."""
        return self.exit_code is None or self.exit_code < 0


def _retry_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.transient


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def run_stage(stage: str, workspace: Path, env: dict[str, str]) -> None:
    """`dvc repro --single-item <stage>` with its output in the task's log."""
    logger = get_run_logger()
    proc = subprocess.Popen([*DVC, "repro", "--single-item", stage], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        logger.info(line.rstrip())
    if proc.wait() != 0:
        found = re.search(r"exited with (-?\d+)", "".join(lines))
        raise StageFailed(stage, int(found.group(1)) if found else None, "".join(lines[-40:]))


@contextlib.contextmanager
def locked_workspace(repo: Path, key: str) -> Iterator[Path]:
    ws = repo / WORKSPACES / key
    ws.parent.mkdir(parents=True, exist_ok=True)
    with open(ws.parent / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another flow run is using the workspace {ws}") from None
        yield ws


@task
def prepare_workspace(ws: Path, repo: Path, commit: str, params: dict, dvc_remote: str | None) -> None:
    if not (ws / ".git").exists():
        _sh(["git", "clone", "-q", "--no-checkout", str(repo), str(ws)], repo)
    else:
        _sh(["git", "fetch", "-q", "origin"], ws)
    _sh(["git", "checkout", "-q", "--force", commit], ws)
    if (repo / ".dvc" / "config.local").exists():  # the project's own remote settings, credentials
        shutil.copy(repo / ".dvc" / "config.local", ws / ".dvc" / "config.local")
    _sh([*DVC, "cache", "dir", "--local", str(repo / ".dvc" / "cache")], ws)
    if dvc_remote:
        _sh([*DVC, "remote", "add", "--local", "--force", "--default", "flow", dvc_remote], ws)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class DamagedFiles(RuntimeError):
    """The workspace or the DVC cache holds damaged files; the message names each and its remedy."""


@task
def verify_workspace(ws: Path) -> None:
    """Before any stage runs: no damaged file among the workspace's outputs (left by a failed run) or
    the DVC cache's copies of the outputs dvc.lock names (DVC restores a cached copy as it is). Files
    that merely differ from dvc.lock are the stages' business (they rerun)."""
    problems, checked = integrity.verify(ws, against_lock=False)
    if problems:
        raise DamagedFiles("damaged files; nothing was run:\n" + "\n".join(problems))
    get_run_logger().info(f"{checked} output files in the workspace and the DVC cache's copies are intact")


@task
def save_experiment(ws: Path, name: str, git_remote: str, push: bool) -> None:
    """`dvc exp save`, then `dvc exp push`: the experiment to the git remote and its outputs to the
    DVC remote; without a DVC remote, the outputs stay in this machine's DVC cache."""
    _sh(["git", "add", "-A"], ws)  # new files in git's care too (curves of a first run): exp save skips them
    _sh([*DVC, "exp", "save", "--force", "-n", name], ws)
    if not push:
        return
    try:
        _sh([*DVC, "remote", "default"], ws)
        outputs = []
    except RuntimeError:
        print(f"no DVC remote: the outputs of {name} stay in this machine's DVC cache")
        outputs = ["--no-cache"]
    _sh([*DVC, "exp", "push", "--force", *outputs, git_remote, name], ws)


def metrics_markdown(title: str, metrics: dict) -> str:
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in tracking.flatten(metrics).items()]
    return "\n".join(lines) + "\n"


@flow(name="bayeskd-pipeline", log_prints=True)
def pipeline(
    teacher_loss: Loss | None = None,
    seed: int | None = None,
    set_params: dict[str, Any] | None = None,
    experiment: str | None = None,
    repo: str = ".",
    rev: str = "HEAD",
    git_remote: str | None = None,
    dvc_remote: str | None = None,
    push: bool = True,
) -> dict:
    """Run the DVC pipeline at `rev` with overrides (`set_params` takes any dotted key of
    params.yaml), save it as DVC experiment `experiment`, publish its metrics."""
    root = Path(repo).resolve()
    commit = _sh(["git", "rev-parse", rev], root)
    overrides = dict(set_params or {})
    if teacher_loss is not None:
        overrides["teacher.loss"] = teacher_loss
    if seed is not None:
        overrides["seed"] = seed
    params = checked_params(root, commit, overrides)
    key = hashlib.sha256(json.dumps([commit, overrides], sort_keys=True).encode()).hexdigest()[:12]
    name = experiment or f"{params['teacher']['loss']}-seed{params['seed']}-{key[:6]}"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(root),
        "DVC_EXP_NAME": name, "DVC_EXP_BASELINE_REV": commit,
        "BAYESKD_EXECUTION": f"prefect-{flow_run.id}",  # its stages' one MLflow run
    }
    with locked_workspace(root, key) as ws:
        prepare_workspace(ws, root, commit, params, dvc_remote)
        verify_workspace(ws)
        for stage in stage_names(ws):
            run_stage(stage, ws, env)
        save_experiment(ws, name, git_remote or git_origin(root) or str(root), push)
        metrics = json.loads((ws / report.METRICS_FILE).read_text())
        shutil.rmtree(ws)
    create_markdown_artifact(markdown=metrics_markdown(f"{name} ({commit[:7]})", metrics),
                             key="bayeskd-metrics", description=f"bayeskd pipeline: {name}")
    return {"experiment": name, "commit": commit, "metrics": metrics}


@task(task_run_name="{name}")
def dispatch(deployment: str, name: str, parameters: dict) -> str:
    """Run one variant as a flow run of `deployment`, on whichever worker takes it; wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, flow_run_name=name, timeout=None)
    if not run.state.is_completed():
        raise RuntimeError(f"variant {name} ended {run.state.name}: {run.state.message}")
    return name


def _link_mlflow(root: Path, names: list[str], table: Path, title: str) -> None:
    """A parent MLflow run holding the table, with the variants' runs as its children."""
    import mlflow

    try:
        tracking.set_experiment(tracking.tracking_uri(root))
        client = mlflow.MlflowClient()
        with mlflow.start_run(run_name=title) as parent:
            mlflow.log_param("variants", ",".join(names))
            mlflow.log_artifacts(str(table), "comparison")
            for r in mlflow.search_runs(output_format="list", experiment_names=[tracking.EXPERIMENT]):
                if r.data.tags.get("dvc.experiment") in names:
                    client.set_tag(r.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    except Exception as e:  # tracking never fails the comparison
        print(f"warning: MLflow parent run not written: {type(e).__name__}: {e}", file=sys.stderr)


@flow(name="bayeskd-compare", log_prints=True)
def compare(
    teacher_losses: list[Loss] = ["ce", "mse"],  # noqa: B006 (Prefect reads the default)
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    presets: dict[str, dict[str, Any]] | None = None,
    repo: str = ".",
    rev: str = "HEAD",
    deployment: str | None = None,
    dvc_remote: str | None = None,
) -> str:
    """Every teacher loss x seed (x preset: a name for a set of overrides) as its own DVC experiment,
    then the comparison table as a Prefect artifact, files under reports/compare/ and an MLflow
    parent run. With `deployment`, variants run as flow runs of that deployment, in parallel on its
    work pool's workers; without, one after another in this process."""
    root = Path(repo).resolve()
    commit = _sh(["git", "rev-parse", rev], root)
    variants = {}
    for preset, overrides in (presets or {"": {}}).items():
        for loss in teacher_losses:
            for seed in seeds:
                name = "-".join(p for p in (preset, loss, f"seed{seed}", commit[:7]) if p)
                variants[name] = {"teacher_loss": loss, "seed": seed, "set_params": overrides,
                                  "experiment": name, "rev": commit, "dvc_remote": dvc_remote}
    if deployment:
        futures = [dispatch.submit(deployment, n, p) for n, p in variants.items()]
        for f in futures:
            f.result()
        if origin := git_origin(root):  # where the workers pushed them
            report.pull_experiments(origin, root, (commit,))
    else:
        for p in variants.values():
            pipeline(repo=str(root), **p)

    runs = [r for r in report.collect(root, (commit,)) if r.rev in variants]
    rows = report.summarise(runs)
    out = root / "reports" / "compare"
    markdown = report.to_markdown(rows)
    write_text(out / "table.md", markdown)
    write_text(out / "table.csv", report.to_csv(rows))
    report.plot(runs, out)
    _link_mlflow(root, sorted(variants), out, f"compare {commit[:7]}")
    create_markdown_artifact(markdown=f"## CE vs MSE teachers at {commit[:7]}\n\n{markdown}",
                             key="bayeskd-comparison", description="bayeskd teacher comparison")
    print(markdown)
    return markdown


def checked_params(root: Path, rev: str, overrides: dict[str, Any]) -> dict:
    """params.yaml at `rev` with the overrides, validated (ParamsError names each bad key)."""
    base = config.parse_yaml(_sh(["git", "show", f"{rev}:params.yaml"], root), f"params.yaml at {rev}")
    return config.with_overrides(base, overrides)


def cli_overrides(argv: list[str]) -> dict[str, Any]:
    """`key=value` arguments (values parsed as YAML) for running flows from the command line."""
    out = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        try:
            if not sep:
                raise config.ParamsError(f"expected key=value, got {arg!r}")
            out[key] = config.parse_yaml(value, arg)
        except config.ParamsError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return out


def run_pipeline_cli(argv: list[str]) -> None:
    """`python -m flows.pipeline key=value ...`: bad overrides end with one `error:` line and exit
    code 2, before Prefect starts. Without a Prefect server, the temporary one Prefect starts gets
    two minutes rather than twenty seconds to come up, as it can need on a busy two-core machine."""
    overrides = cli_overrides(argv)
    try:
        checked_params(Path(".").resolve(), "HEAD", overrides)
    except config.ParamsError as e:
        print(f"error: invalid parameters\n{e}", file=sys.stderr)
        raise SystemExit(2) from None
    startup = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    with temporary_settings({startup: max(startup.value(), 120)}):
        pipeline(set_params=overrides)
