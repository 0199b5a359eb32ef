"""Bad input and faults: each ends with one `error:` line naming the file or key, exit code 2, no
traceback, and every earlier output byte-identical afterwards; a damaged file is named as damaged,
with a command that really restores it; two runs in one workspace never mix their parameters.

Parameter faults go through `dvc repro` (DVC must not remove any output before the parameters are
refused); file faults run the stage that meets them. A full disk and a read-only directory are real
small tmpfs filesystems mounted over the output directory (this needs root, as CI has)."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bayeskd import integrity, runs
from bayeskd.cache import FORMAT
from conftest import run

pytestmark = pytest.mark.slow

OUTPUTS = ("models", "reports", "dvclive", "cache", "data", "checkpoints")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for d in OUTPUTS if (root / d).exists()
            for f in sorted((root / d).rglob("*")) if f.is_file()}


@pytest.fixture
def project(built):
    """A copy of the project on which the whole pipeline ran once, committed (conftest)."""
    return built


def one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    return errors[0]


def set_params(root: Path, **dotted) -> None:
    p = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = p
        for part in parents:
            node = node[part]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


PARAM_FAULTS = {
    "unknown top-level key": (lambda r: (r / "params.yaml").write_text(
        (r / "params.yaml").read_text() + "bogus: 1\n"), ["bogus = 1: unknown key"]),
    "bad optimizer value": (lambda r: set_params(r, **{"teacher.optim.momentum": 2.0}),
                            ["teacher.optim.momentum = 2.0"]),
    "bad opset": (lambda r: set_params(r, **{"export.opset": 99}), ["export.opset = 99"]),
    "empty params.yaml": (lambda r: (r / "params.yaml").write_text(""), ["params.yaml"]),
    "infinite learning rate": (lambda r: set_params(r, **{"teacher.optim.lr": float("inf")}),
                               ["teacher.optim.lr = inf", "finite"]),
    "top-k of all classes": (lambda r: set_params(r, **{"cache.topk": 10}),
                             ["cache.topk = 10", "below the 10 classes"]),
    "runaway epochs": (lambda r: set_params(r, **{"teacher.optim.epochs": 10**12}),
                       ["teacher.optim.epochs = 1000000000000: must be between 1 and 10,000"]),
    "milestone past the epochs": (lambda r: set_params(r, **{"teacher.optim.milestones": [3]}),
                                  ["teacher.optim: milestones = [3]: 3 not within the 3 epochs"]),
    "ten samples": (lambda r: set_params(r, **{"data.gaussian.n_samples": 10}),
                    ["data.gaussian: n_samples = 10 gives", "at least n_classes = 10"]),
}


@pytest.mark.parametrize("fault", sorted(PARAM_FAULTS))
def test_bad_params_stop_dvc_before_any_output_is_removed(project, fault):
    mutate, expected = PARAM_FAULTS[fault]
    before = snapshot(project)
    mutate(project)
    result = run(["dvc", "repro"], project, check=False)
    one_error_line(result, *expected)
    assert snapshot(project) == before


def test_an_experiment_with_an_unknown_key_is_refused(project):
    before = snapshot(project)
    result = run(["dvc", "exp", "run", "-S", "+bogus=1"], project, check=False)
    one_error_line(result, "bogus = 1: unknown key")
    assert run(["dvc", "exp", "list", "--name-only"], project).stdout.strip() == ""
    assert snapshot(project) == before


MANIFEST = "cache/teacher_logits/manifest.json"
SEALED = integrity.seal({"format": FORMAT})  # a manifest, intact, of the current format, but empty


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FILE_FAULTS = {
    # fault: (damage, stage that meets it, text the error line holds)
    "truncated teacher, evaluate": (lambda r: truncate(r / "models/teacher.safetensors"), "evaluate",
                                    "cannot read models/teacher.safetensors"),
    "truncated teacher, distill": (lambda r: truncate(r / "models/teacher.safetensors"), "distill",
                                   "cannot read models/teacher.safetensors"),
    "manifest with bad bytes": (lambda r: (r / MANIFEST).write_bytes(b"\xff\xfe{"), "distill",
                                "manifest.json: damaged"),
    "manifest with bad JSON": (lambda r: (r / MANIFEST).write_text('{"format": '), "distill",
                               "manifest.json: damaged"),
    "manifest missing a key": (lambda r: (r / MANIFEST).write_text(json.dumps(SEALED)), "distill",
                               "manifest.json: damaged (no entry"),
    "manifest with a changed count": (lambda r: edit(r / MANIFEST, '"num_samples": 1200', '"num_samples": 1'),
                                      "distill", "manifest.json: damaged (its content does not match"),
    "info.json with a changed count": (lambda r: edit(r / "data/prepared/info.json", '"num_classes": 10',
                                                      '"num_classes": 11'), "train_teacher",
                                       "data/prepared/info.json: damaged"),
    "diverging loss": (lambda r: set_params(r, **{"teacher.optim.lr": 1e30}), "train_teacher",
                       "the loss became non-finite"),
}


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_damaged_inputs_end_the_stage_with_one_line(project, fault):
    damage, stage, expected = FILE_FAULTS[fault]
    damage(project)
    before = snapshot(project)
    result = run(["python", f"stages/{stage}.py"], project, check=False)
    assert result.returncode == 2
    one_error_line(result, expected)
    assert snapshot(project) == before


def test_an_unreadable_checkpoint_is_moved_aside_and_training_starts_afresh(project, monkeypatch):
    reference = (project / "models/teacher.safetensors").read_bytes()
    (project / "checkpoints").mkdir(exist_ok=True)
    (project / "checkpoints/teacher.pt").write_bytes(b"not a checkpoint")
    # another thread count in the environment than the one that trained the reference: the stage
    # keeps compute.threads (1), so the weights are the same bits
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    result = run(["python", "stages/train_teacher.py"], project)
    assert "warning: checkpoint checkpoints/teacher.pt is unreadable" in result.stdout
    assert "weights_only=False" not in result.stdout + result.stderr
    assert (project / "checkpoints/teacher.pt.unreadable").read_bytes() == b"not a checkpoint"
    assert (project / "models/teacher.safetensors").read_bytes() == reference  # the same training
    epochs = [line for line in result.stdout.splitlines() if " epoch " in line]
    assert len(epochs) == 3 and "\r" not in result.stdout + result.stderr  # one line per epoch in logs


@contextlib.contextmanager
def small_filesystem(directory: Path, free_bytes: int | None = None, read_only: bool = False):
    """`directory` on a fresh tmpfs holding its old files, then filled up to `free_bytes` left, or
    remounted read-only. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    keep = directory.with_name(directory.name + ".orig")
    shutil.copytree(directory, keep)
    run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(directory)], directory.parent)
    try:
        shutil.copytree(keep, directory, dirs_exist_ok=True)
        if free_bytes is not None:  # a filler in a folder of its own, which no stage clears
            (directory / ".filler").mkdir()
            with open(directory / ".filler/zeros", "wb", buffering=0) as f:
                f.write(bytes(shutil.disk_usage(directory).free - free_bytes))
        if read_only:
            run(["mount", "-o", "remount,ro", str(directory)], directory.parent)
        yield
    finally:
        run(["umount", str(directory)], directory.parent, check=False)
        shutil.rmtree(keep)


OUTPUT_FAULTS = {
    # fault: (directory on the small filesystem, stage, free bytes or None for read-only, error text)
    "full disk, evaluate": ("reports", "evaluate", 4096, "No space left on device"),
    "read-only reports, evaluate": ("reports", "evaluate", None, "Read-only file system"),
    "read-only models, export": ("models", "export_onnx", None, "Read-only file system"),
    "full disk, teacher": ("models", "train_teacher", 4096, "No space left on device"),
}


@pytest.mark.parametrize("fault", sorted(OUTPUT_FAULTS))
def test_unwritable_outputs_end_the_stage_with_one_line_and_keep_the_old_ones(project, fault):
    directory, stage, free, reason = OUTPUT_FAULTS[fault]
    before = snapshot(project)
    with small_filesystem(project / directory, free_bytes=free, read_only=free is None):
        result = run(["python", f"stages/{stage}.py"], project, check=False)
        after = {k: v for k, v in snapshot(project).items() if "/.filler/" not in k}
    assert result.returncode == 2
    line = one_error_line(result, reason)
    assert line.startswith(f"error: cannot write {directory}/")
    if stage != "train_teacher":  # a training run's curves and checkpoint are its progress, kept to resume
        assert after == before
    else:
        assert after["models/teacher.safetensors"] == before["models/teacher.safetensors"]


def test_a_full_disk_in_the_cache_build_says_so_and_the_build_resumes(project):
    """The cache is too large to keep an old copy beside a new one: a failed build keeps its
    complete shards and resumes from them once there is room."""
    set_params(project, **{"cache.dtype": "float32", "cache.shard_size": 300})  # a new build, 4 shards
    with small_filesystem(project / "cache/teacher_logits", free_bytes=4096):  # and the old build's room
        result = run(["python", "stages/cache_logits.py"], project, check=False)
        assert result.returncode == 2
        one_error_line(result, "error: cannot write cache/teacher_logits/", "No space left on device")
        shutil.rmtree(project / "cache/teacher_logits/.filler")  # room again
        resumed = run(["python", "stages/cache_logits.py"], project).stdout
    assert "cache shard 1/4: already built" in resumed


@pytest.mark.parametrize("override,expected", [
    ("teacher.loss=hinge", "teacher.loss = 'hinge': not allowed"),
    ("seed=[1", "seed=[1: not valid YAML: expected ',' or ']'"),
])
def test_a_bad_override_of_the_pipeline_flow_is_one_line(project, override, expected):
    result = run(["python", "-m", "flows.pipeline", override], project, check=False)
    assert result.returncode == 2
    one_error_line(result, expected)
    assert len((result.stdout + result.stderr).splitlines()) <= 3


def test_a_damaged_prepared_split_is_named(project):
    truncate(project / "data/prepared/train.npz")
    result = run(["python", "stages/train_teacher.py"], project, check=False)
    assert result.returncode == 2
    one_error_line(result, "data/prepared/train.npz: damaged")



# --- integrity: damage that DVC does not see -------------------------------------------------------

TEACHER = "models/teacher.safetensors"


def flip(path: Path, at: int = -100) -> None:
    """Flip one byte in place (as root, also in a read-only DVC cache object, whose mode DVC trusts)."""
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def cache_object(root: Path, path: str) -> Path:
    """The DVC cache's copy of a file output, as dvc.lock names it."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(o["md5"] for st in lock["stages"].values() for o in st.get("outs", []) if o["path"] == path)
    return root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def command_in(line: str) -> str:
    """The last `...` command an error line names."""
    return re.findall(r"`([^`]+)`", line)[-1]


def test_a_teacher_damaged_in_the_dvc_cache_is_named_and_the_named_command_restores_it(project):
    """The damage DVC cannot see: a flipped byte in the cache object, restored by `dvc checkout` (DVC
    trusts its cache: `dvc status` says nothing changed). distill names the teacher as damaged, not
    the cache as stale, and the command it names really restores the teacher, in the cache too."""
    intact = (project / TEACHER).read_bytes()
    flip(cache_object(project, TEACHER))
    (project / TEACHER).unlink()
    run(["dvc", "checkout"], project)
    assert (project / TEACHER).read_bytes() != intact  # DVC restored the damaged copy
    before = snapshot(project)
    result = run(["python", "stages/distill.py"], project, check=False)
    assert result.returncode == 2
    line = one_error_line(result, f"error: {TEACHER}: damaged (its tensors do not match the sha256",
                          "the DVC cache's copy", "is damaged too")
    assert snapshot(project) == before
    fix = command_in(line)
    assert fix.startswith("rm -f ") and fix.endswith(" && dvc repro")
    run(["bash", "-c", fix], project)
    assert (project / TEACHER).read_bytes() == intact
    assert cache_object(project, TEACHER).read_bytes() == intact
    assert integrity.verify(project)[0] == []


def test_a_teacher_damaged_in_the_workspace_is_named_and_dvc_checkout_force_restores_it(project):
    intact = (project / TEACHER).read_bytes()
    flip(project / TEACHER)
    before = snapshot(project)
    result = run(["python", "stages/cache_logits.py"], project, check=False)
    assert result.returncode == 2
    line = one_error_line(result, f"error: {TEACHER}: damaged")
    assert snapshot(project) == before  # the cache was not rebuilt from the damaged teacher
    assert command_in(line) == f"dvc checkout --force {TEACHER}"
    run(command_in(line).split(), project)
    assert (project / TEACHER).read_bytes() == intact


def test_a_failed_evaluate_keeps_the_old_reports(project):
    """evaluate's and export_onnx's outputs persist, so DVC does not remove them before the stage
    runs, and the stage writes atomically: a damaged input leaves the old metrics and plots."""
    flip(project / TEACHER)
    before = snapshot(project)
    result = run(["dvc", "repro", "-f", "-s", "evaluate"], project, check=False)
    one_error_line(result, f"error: {TEACHER}: damaged", f"`dvc checkout --force {TEACHER}`")
    assert "exited with 2" in result.stdout + result.stderr
    assert snapshot(project) == before


def every_output_file(root: Path) -> list[str]:
    return sorted(f for out in integrity.lock_outputs(root) for f in
                  ([out.path] if not out.is_dir else
                   [p.relative_to(root).as_posix() for p in (root / out.path).rglob("*") if p.is_file()]))


def test_verify_names_a_flipped_byte_in_any_output_and_in_any_cached_copy(project):
    assert integrity.verify(project)[0] == []
    files = every_output_file(project)
    assert len(files) > 30 and "reports/plots/reliability_student.csv" in files
    for f in files:
        path = project / f
        # a byte in the middle; in a model also the last one (an ONNX model's digest is at its end)
        for at in (path.stat().st_size // 2, *([-1] if f.startswith("models/") else [])):
            original = path.read_bytes()
            flip(path, at)
            try:
                problems, _ = integrity.verify(project)
            finally:
                path.write_bytes(original)
            assert len(problems) == 1 and problems[0].startswith(f"{f}: "), (f, at, problems)
    # the DVC cache's copies of the outputs dvc.lock records as cached (its run cache also keeps
    # copies of the curves, which are in git; verify checks the workspace's curves, above)
    cached = [o for o in integrity.lock_outputs(project) if o.cached]
    md5s = {o.md5 for o in cached}
    for o in cached:
        if o.md5.endswith(".dir"):
            listing = project / ".dvc/cache/files/md5" / o.md5[:2] / o.md5[2:]
            md5s |= {entry["md5"] for entry in json.loads(listing.read_text())}
    objects = sorted(project / ".dvc/cache/files/md5" / m[:2] / m[2:] for m in md5s)
    assert all(obj.is_file() for obj in objects)
    named = set()
    for obj in objects:  # (files of equal content share one)
        original = obj.read_bytes()
        flip(obj, len(original) // 2)
        try:
            problems, _ = integrity.verify(project)
        finally:
            obj.write_bytes(original)
        shown = str(obj.relative_to(project))
        assert problems and all("DVC cache's" in p and shown in p for p in problems), (obj, problems)
        named |= {p.split(":")[0] for p in problems}
    assert TEACHER in named and "data/prepared" in named  # a file, and a directory's list of files


def test_bayeskd_verify_names_each_bad_file_with_one_error_line(project):
    flip(project / TEACHER)
    flip(project / "reports/metrics.json", 5)
    result = run(["bayeskd", "verify"], project, check=False)
    assert result.returncode == 1
    one_error_line(result, "2 of the ", f"{TEACHER}: damaged", f"`dvc checkout --force {TEACHER}`",
                   "reports/metrics.json: differs from dvc.lock; restore it with "
                   "`git checkout -- reports/metrics.json`")


# --- one experiment per workspace ---------------------------------------------------------------

# a stand-in `dvc` command: it runs its first argument as Python code in a child process, as DVC
# runs a stage, so that bayeskd.runs finds it among the child's parents
DVC = "import subprocess, sys\nsys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)\n"
WAIT = "import sys, time\nfrom pathlib import Path\nwhile not Path(sys.argv[1]).exists(): time.sleep(0.01)\n"
VALIDATE = "from bayeskd import runs\nruns.mark('d')\n"
CHECK = "from bayeskd import runs\nprint(runs.problem('d') or 'ok')\n"


def test_a_stage_refuses_parameters_validated_by_a_later_or_running_dvc_command(tmp_path):
    """Which DVC command validated the parameters, against the stage's own: one that ran before it
    (a flow runs check_params, then each stage, in separate commands, the next often within a
    second) or in an earlier boot of the machine is fine; one begun after it, or still running, is
    another run. Real processes."""
    (tmp_path / "dvc").write_text(DVC)
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "params.validated.json").write_text(json.dumps({"params_sha256": "d"}))
    env = os.environ | {"DVC_STAGE": "stand-in"}

    def dvc(code: str, *args: str, wait: bool = True) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(tmp_path / "dvc"), code, *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, text=True)
        if wait:
            p.wait(timeout=60)
        return p

    assert dvc(VALIDATE).returncode == 0
    assert dvc(CHECK).stdout.read().strip() == "ok"  # validated by a command that ran before
    stage = dvc(WAIT + CHECK, str(tmp_path / "checks"), wait=False)  # begun before the next validation
    time.sleep(0.1)
    dvc(VALIDATE)
    (tmp_path / "checks").touch()
    assert "begun after this one or still running" in stage.communicate(timeout=60)[0]
    validating = dvc(VALIDATE + WAIT, str(tmp_path / "ends"), wait=False)
    deadline = time.monotonic() + 60
    while json.loads((tmp_path / runs.MARKER).read_text())["dvc"]["pid"] != validating.pid:
        assert validating.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    assert "begun after this one or still running" in dvc(CHECK).stdout.read()  # the validator still runs
    (tmp_path / "ends").touch()
    validating.wait(timeout=60)
    assert dvc(CHECK).stdout.read().strip() == "ok"
    marker = json.loads((tmp_path / runs.MARKER).read_text())
    marker["dvc"]["started"] += 1e6  # begun after this one...
    (tmp_path / runs.MARKER).write_text(json.dumps(marker))
    assert "begun after this one" in dvc(CHECK).stdout.read()
    marker["dvc"]["boot"] = "another boot"  # ...but in an earlier boot of the machine
    (tmp_path / runs.MARKER).write_text(json.dumps(marker))
    assert dvc(CHECK).stdout.read().strip() == "ok"


def test_two_experiments_in_one_workspace_do_not_mix_their_parameters(project, tmp_path):
    """`dvc exp run -S seed=1 & dvc exp run -S seed=2`, the second while the first trains its teacher:
    the second rewrites params.yaml (and may run check_params) before DVC's lock on the teacher's
    files refuses it. The first run stops with one line naming the cause, before any stage uses (or
    DVC records) the second's parameters: no stage of dvc.lock but check_params records seed 2, no
    MLflow run, no experiment. The teacher's stage is paused (SIGSTOP) while the second runs, so the
    second always comes in while it trains, however loaded the machine."""
    import psutil

    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(["dvc", "exp", "run", "-S", "seed=1", "-S", "teacher.optim.epochs=20"],
                                 cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        training: list[psutil.Process] = []
        while not training:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(psutil.NoSuchProcess):  # a child gone while listed
                training = [c for c in psutil.Process(first.pid).children(recursive=True)
                            if any(a.endswith("train_teacher.py") for a in c.cmdline())]
            time.sleep(0.1)
        for c in training:
            c.suspend()
        try:
            second = run(["dvc", "exp", "run", "-S", "seed=2"], project, check=False)
        finally:
            for c in training:
                c.resume()
        assert second.returncode != 0
        assert yaml.safe_load((project / "params.yaml").read_text())["seed"] == 2  # it came in
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    result = subprocess.CompletedProcess(first.args, first.returncode, log.read_text(), "")
    one_error_line(result, "params.yaml", "--queue")
    assert "Created version" not in result.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    seeds = {name: st["params"]["params.yaml"].get("seed") for name, st in lock.items()}
    assert all(seed in (None, 0, 1) for name, seed in seeds.items() if name != "check_params"), seeds
    assert not (tmp_path / "mlflow.db").exists()  # export_onnx, which logs the run, never ran
    assert run(["dvc", "exp", "list", "--name-only"], project).stdout.strip() == ""
