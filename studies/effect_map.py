"""The effect map: where does the MSE teacher help? (README, "Where does the MSE teacher help?")

A fixed sweep, queued as DVC experiments of this project: teacher loss (ce, mse, ls) x teacher
training budget (short, default, long) x seed (0, 1, 2) x distillation method (kd, dist), on the
gaussian default and on gaussian_images (preset gaussian_images-cpu). The students' recipe stays
fixed. Then `bayeskd compare` publishes it: per configuration, the teachers' bcpd_mse and ECE, the
students' accuracy and the paired MSE - CE (and LS - CE) student difference with its 95% interval,
and `--plot` the figure of student gain against the teacher's bcpd_mse gap.

    python studies/effect_map.py queue [gaussian] [images]   # queue the sweep (default: both)
    dvc queue start -j 2                                      # run it; `dvc queue status` to follow
    bayeskd compare --format md --plot reports/effect_map     # the table and the figures

The sweep was fixed before it was run; change it here, not after looking at its results.
"""

from __future__ import annotations

import subprocess
import sys

from bayeskd import config

GRID = {"teacher.loss": ["ce", "mse", "ls"], "seed": [0, 1, 2], "student.method": ["kd", "dist"]}
STUDIES = {
    # teacher SGD on 5,000 samples, batch 64; the default is the project's own recipe
    "gaussian": ({}, {
        "short": {"teacher.optim.epochs": 3, "teacher.optim.lr": 0.02, "teacher.optim.milestones": [2]},
        "default": {"teacher.optim.epochs": 10, "teacher.optim.lr": 0.02, "teacher.optim.milestones": [7]},
        "long": {"teacher.optim.epochs": 40, "teacher.optim.lr": 0.05, "teacher.optim.milestones": [30]},
    }),
    # resnet20 -> resnet8 on 1,000 images; the preset's 15 epochs are the default
    "images": (config.preset("gaussian_images-cpu"), {
        "short": {"teacher.optim.epochs": 5, "teacher.optim.milestones": [4]},
        "default": {"teacher.optim.epochs": 15, "teacher.optim.milestones": [11]},
        "long": {"teacher.optim.epochs": 45, "teacher.optim.milestones": [34]},
    }),
}


def queue_commands(study: str) -> list[list[str]]:
    """One `dvc exp run --queue` per method and budget, the other axes as DVC's comma-separated
    sweeps. Methods outermost: the second method's runs find their teachers in DVC's run cache."""
    base, regimes = STUDIES[study]
    commands = []
    for method in GRID["student.method"]:
        for regime in regimes.values():
            fixed = {k: v for k, v in (base | regime).items() if k not in GRID} | {"student.method": method}
            args = config.override_args(fixed)
            args += [a for k, values in GRID.items() if k != "student.method"
                     for a in ("-S", f"{k}={','.join(map(str, values))}")]
            commands.append(["dvc", "exp", "run", "--queue", *args])
    return commands


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "queue":
        raise SystemExit(__doc__)
    for study in argv[1:] or list(STUDIES):
        if study not in STUDIES:
            raise SystemExit(f"error: no study {study!r}; expected one of {', '.join(STUDIES)}")
        for command in queue_commands(study):
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
