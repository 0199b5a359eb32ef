"""One DVC run per workspace at a time: every stage uses the params.yaml validated for its run.

In one workspace, `dvc exp run -S seed=1 & dvc exp run -S seed=2` does not run two experiments: the
second writes its parameters into params.yaml before DVC's lock refuses it, and may even run
check_params (DVC locks only the files of the stage it runs), while the first goes on with them.
So:
- check_params records the digest of the parameter values it validated (`config.VALIDATED_FILE`,
  an output: the same for the same parameters), and which DVC command validated them, with its
  start (`MARKER`, under .dvc/tmp: it differs on every run, so it is no output, and dvc.lock stays the
  same for the same parameters);
- every stage that DVC runs checks, before it starts, that params.yaml is the validated one and
  that they were not validated by another DVC command that began after its own or is still running
  (start times since the machine booted, exact to the OS's tick: a stage's DVC command may start
  within a second of the one that validated, as the Prefect flow runs them); and, when it ends,
  that params.yaml did not change while it ran. A stage run by hand reads params.yaml as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bayeskd import config
from bayeskd.io import write_json

MARKER = ".dvc/tmp/bayeskd-validated.json"
ADVICE = ("Run one experiment per workspace at a time (several side by side: `dvc exp run --queue` or "
          "`--temp`); `git checkout -- params.yaml` brings back HEAD's parameters")


def under_dvc() -> bool:
    """Whether DVC runs this process as a stage (DVC sets DVC_STAGE)."""
    return bool(os.environ.get("DVC_STAGE"))


def params_digest() -> str | None:
    """The digest of params.yaml's values as the file is now (config.digest); None if unreadable."""
    try:
        return config.digest(config.read(config.PARAMS_FILE))
    except config.ParamsError:
        return None


def _since_boot(process) -> float:
    """When `process` started, in seconds since the machine booted. psutil's create_time() is that
    plus the boot time, which Linux gives in whole seconds and moves when the clock is adjusted;
    the difference is exact, and comparable between processes."""
    import psutil

    return round(process.create_time() - psutil.boot_time(), 2)


def _boot() -> str:
    """This boot of the machine: Linux's boot id, elsewhere the boot time."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import psutil

        return str(round(psutil.boot_time()))


def dvc_command() -> dict | None:
    """The DVC command running this process: its pid, start (`_since_boot`, in this `boot`) and
    command line; None if none is found (DVC called from Python)."""
    import psutil

    try:
        for p in psutil.Process().parents():
            args = p.cmdline()
            if any(Path(a).name == "dvc" for a in args[:2]) or args[1:3] == ["-m", "dvc"]:
                return {"pid": p.pid, "started": _since_boot(p), "boot": _boot(),
                        "cmd": " ".join(args[1:])[:200]}
    except psutil.Error:
        return None
    return None


def _running(command: dict) -> bool:
    """Whether the DVC command recorded by dvc_command() in this boot still runs (its pid, not
    reused since: the same start)."""
    import psutil

    try:
        p = psutil.Process(command["pid"])
        return _since_boot(p) == command["started"] and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


def mark(digest: str) -> None:
    """For check_params, once it has written config.VALIDATED_FILE: which DVC command validated the
    parameters with `digest`."""
    if under_dvc() and Path(MARKER).parent.is_dir():
        write_json(MARKER, {"params_sha256": digest, "dvc": dvc_command()})


def _read(path: str) -> dict:
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def problem(digest: str | None) -> str | None:
    """Why a stage that DVC runs must not use the params.yaml whose values have `digest`, or None."""
    if digest != _read(config.VALIDATED_FILE).get("params_sha256"):
        return (f"params.yaml is not the one check_params validated for this run ({config.VALIDATED_FILE}): "
                f"another run or an edit changed it; this stage stops before it mixes two runs' parameters. "
                + ADVICE)
    marker, me = _read(MARKER), dvc_command()
    other = marker.get("dvc")
    if (me and isinstance(other, dict) and other.get("boot") == me["boot"] and other.get("pid") != me["pid"]
            and (other.get("started", 0) > me["started"] or _running(other))):
        return (f"another DVC run (PID {other.get('pid')}: {other.get('cmd')}), begun after this one or "
                "still running, rewrote params.yaml and validated it; this stage stops before it mixes two "
                "runs' parameters. " + ADVICE)
    return None


def changed_while_running(started_with: str | None) -> str | None:
    """Why a stage that DVC ran must fail after all (its outputs unrecorded), or None."""
    if params_digest() != started_with:
        return ("params.yaml changed while this stage ran; it fails so that DVC does not record its outputs "
                "with other parameters than they were made with. " + ADVICE)
    return None
