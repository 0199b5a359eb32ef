import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bayeskd.config import with_overrides

# Under pytest-xdist (`pytest -n auto`, as `make test` runs) the workers share the cores: one thread
# each, in the tests and in the DVC stages they start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)  # the environment's python and dvc


# The modules of the longest tests (per `pytest --durations`), run first, then the other slow tests,
# the unit tests last: under pytest-xdist a long test that starts last leaves the other workers idle.
LONGEST_FIRST = ("test_compare.py", "test_team.py", "test_tracking.py", "test_flows.py",
                 "test_methods_pipeline.py", "test_synthetic.py", "test_datasets.py", "test_pipeline.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> tuple[bool, int]:
        name = item.path.name
        return (item.get_closest_marker("slow") is None,
                LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST))

    items.sort(key=rank)


def tiny_params(**overrides) -> dict:
    """The project's params.yaml shrunk so a whole pipeline run takes seconds."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["gaussian"].update(n_samples=4000, train_fraction=0.3, val_fraction=0.1)
    for role in ("teacher", "student"):
        p[role]["optim"].update(epochs=3, milestones=[2], lr=0.05)
    p["export"].update(latency_runs=3)
    return with_overrides(p, overrides)


def env() -> dict[str, str]:
    """The environment of the commands tests run: the project's python and dvc first on PATH."""
    return os.environ | {"PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_queue(project: Path) -> None:
    """`dvc queue start`, returning at once: the worker it starts holds on to the output pipes it
    inherits until the queue is empty, so its output goes nowhere (then `wait_for_queue`)."""
    subprocess.run(["dvc", "queue", "start"], cwd=project, env=env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)


def wait_for_queue(project: Path, timeout: float, experiments: int) -> str:
    """Until `dvc queue status` shows nothing queued or running; returns that last status. Each
    status costs a DVC start-up (about 3 s of CPU on 2 busy cores), so between them, once a second,
    the cheap sign of the end: `experiments` more experiment refs in git. The status is asked when
    they are there (at most every 5 s), and every 30 s in any case (a failed experiment adds none)."""
    deadline = time.monotonic() + timeout
    before, asked = len(exp_refs(project)), time.monotonic()
    while True:
        since = time.monotonic() - asked
        if (since > 5 and len(exp_refs(project)) >= before + experiments) or since > 30:
            status = run(["dvc", "queue", "status"], project).stdout
            if "Queued" not in status and "Running" not in status:
                return status
            asked = time.monotonic()
        assert time.monotonic() < deadline, "the queue did not finish"
        time.sleep(1)


def exp_refs(project: Path) -> dict[str, str]:
    """The project's DVC experiments, name -> git ref (not DVC's own refs/exps/exec/...)."""
    listed = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    return {r.rsplit("/", 1)[1]: r for r in listed if not r.startswith("refs/exps/exec/")}


def make_project(dest: Path) -> Path:
    """A copy of the project's tracked files at `dest`, a fresh git repository with tiny parameters."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project (`make_project`) in a temporary directory."""
    return make_project(tmp_path / "project")


def commit_all(repo: Path, message: str) -> str:
    """`git add -A` and commit; the new commit's hash."""
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


@pytest.fixture(scope="session")
def built_project(tmp_path_factory, worker_id) -> Path:
    """A copy of the project (`make_project`) on which `dvc repro` ran once and whose results are
    committed ("ce baseline"), with its DVC cache and MLflow store. Built once per test session and
    shared by every pytest-xdist worker (a file lock in their common temporary directory); tests never
    change it: they take a copy (`built`)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent
    root, done = shared / "built-project", shared / "built-project.done"
    with FileLock(shared / "built-project.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            root.mkdir()
            make_project(root)
            run(["dvc", "repro"], root)
            commit_all(root, "ce baseline")
            done.touch()
    return root


@pytest.fixture
def built(built_project: Path, tmp_path: Path) -> Path:
    """A copy of `built_project`, this test's own."""
    dest = tmp_path / "project"
    shutil.copytree(built_project, dest, symlinks=True)
    return dest


def check_dataset_contract(ds, cfg, directory: Path) -> None:
    """What every dataset maker owes the pipeline (bayeskd.datasets' docstring), for dataset `ds`
    made from params `cfg` (the `data` section); `directory` receives a data.save/data.load round trip."""
    import numpy as np

    from bayeskd import data
    from bayeskd.datasets import DATASETS

    declared = DATASETS[cfg.name]
    assert ds.name == cfg.name and {"train", "test"} <= set(ds.splits) <= set(data.SPLITS)
    assert declared.num_classes(getattr(cfg, declared.key)) in (None, ds.num_classes)
    assert declared.images == (len(ds.in_shape) == 3)
    low, high = ds.value_range
    for s in ds.splits.values():
        assert s.x.dtype == np.float32 and s.x.shape[1:] == ds.in_shape and len(s.x) == len(s.y) > 0
        assert s.y.dtype == np.int64 and 0 <= s.y.min() and s.y.max() < ds.num_classes
        assert low <= s.x.min() and s.x.max() <= high
        if s.p is not None:
            assert s.p.dtype == np.float64 and s.p.shape == (len(s.y), ds.num_classes)
            np.testing.assert_allclose(s.p.sum(1), 1, atol=1e-9)
        if declared.images:  # raw pixels in [0, 1]; any normalisation belongs to the model
            assert 0 <= low and high <= 1
        if ds.info.get("uint8"):
            np.testing.assert_array_equal(np.round(s.x * 255) / 255, s.x)
    rows = np.concatenate([s.x.reshape(len(s.x), -1) for s in ds.splits.values()])
    assert len(np.unique(rows, axis=0)) == len(rows)  # no input twice: validation refuses it
    if "normalize" in ds.info:
        channels = ds.in_shape[0]
        assert declared.images and all(len(ds.info["normalize"][k]) == channels for k in ("mean", "std"))
    data.save(ds, directory)
    back = data.load(directory)
    for k, s in ds.splits.items():  # the on-disk format loses nothing
        np.testing.assert_array_equal(back.splits[k].x, s.x)
        np.testing.assert_array_equal(back.splits[k].y, s.y)


def feature_steps(method: str, steps: int = 30, student_net: str = "cnn_student",
                  teacher_net: str = "cnn_teacher", in_shape: tuple[int, ...] = (1, 8, 8), n: int = 64,
                  lr: float = 0.01,
                  **hparams) -> list[dict[str, float]]:
    """Full-batch SGD steps of feature method `method` (built by bayeskd.distill.distiller, as the
    stage builds it) on random data with a random (fixed) teacher: the named loss terms of every step,
    in the method's first epoch. The method's own parts train with the student."""
    import torch

    from bayeskd import distill, nets
    from bayeskd.batch import Batch

    torch.manual_seed(0)
    x, y = torch.rand(n, *in_shape), torch.randint(0, 10, (n,))
    student = nets.build(student_net, 10, in_shape)
    teacher = nets.build(teacher_net, 10, in_shape)
    method = distill.distiller(method, student, hparams=hparams, teacher=teacher, in_shape=in_shape,
                               num_samples=n)
    opt = torch.optim.SGD([*student.parameters(), *method.extra.parameters()], lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        terms = method.loss_fn(student(x), Batch(x, y, torch.arange(n)), 0)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    return history
