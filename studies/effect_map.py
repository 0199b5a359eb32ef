"""The effect map: where does the MSE teacher (or a calibrated CE teacher) help its student?
(docs/effect-map.md)

PROTOCOL, fixed before any of its runs (change it here, and say so, never after looking at results)

Question. Is a teacher trained with the softmax-MSE loss closer to p* on the transfer set, the
inputs the student distils on, at the temperature the student sees it, and is its student more
accurate, closer to p*, or better calibrated? And is any such gain calibration alone? For that,
`ce_ts`: the CE teacher with a temperature fitted on the validation split (the same training as
`ce`, then one scalar).

Teachers. ce, mse and ce_ts. (Label smoothing, `ls`, is left out to fit the machine time; it tied
with CE in all but one cell of the earlier map.)

Learning rate. Every teacher loss gets the same grid, LRS (SGD, momentum 0.9, batch 64, weight
decay 5e-4, x0.1 at three quarters of the epochs). Per data set and loss the rate is chosen on the
teacher's validation NLL, at the converged budget, KD at T = 4, seed 0 (`bayeskd compare --select
teacher.optim.lr:teacher.val_nll`), never on the test split, never on p*. For ce_ts the NLL is
that of the calibrated teacher. The other budget and temperature keep that rate.

Budgets. "converged": training accuracy on a plateau, measured as evaluate's `teacher.plateau`,
the rise of the training accuracy over the last fifth of the first learning-rate phase (the mean
of that fifth minus the mean of the fifth before), under 0.01. The first phase was sized
beforehand from seed-0 training curves alone (ce and mse at every grid rate, constant rate; no
validation, test or p* number looked at). On both data sets the teachers memorise their training
split before their accuracy stops rising, so a converged teacher is already far past the Bayes
accuracy. gaussian, 120 epochs at a constant rate: rise 0.000 (ce 0.01), 0.006 (ce 0.1, which
oscillates about 0.6), 0.011 (mse 0.01, at 0.93), 0.033 (mse 0.1, oscillating about 0.8); ce 0.01
reached 1.000 by epoch 50. gaussian_images (below), 40 epochs: every curve at 0.99 or more by
epoch 35. Hence first phases of 120 (gaussian) and 45 (images) epochs, then 40 and 15 at a tenth
of the rate. Every run reports its `teacher.plateau`; the study does not enforce it. "overfit"
(gaussian only): twice the epochs, nothing else changed. Students keep one fixed recipe per
data set.

Distillation. KD at T = 1 and T = 4 (0.1 CE + 0.9 T^2 KL), from the logit cache.

Seeds. 0, 1, 2 for every cell; a cell (data, budget, T) gets seeds 3 and 4 for all its losses
where a paired student difference to CE (accuracy, bcpd_mse or ECE) is within two standard
deviations of zero: |mean| < 2 sd of the per-seed differences.

Data and nets, sized to about 2 hours on 2 idle CPU cores (two queue workers of one thread each):
- gaussian, the paper's synthetic benchmark as in params.yaml (5,000 training, 5,000 validation,
  90,000 test samples), mlp_teacher -> mlp_student, students as the default (10 epochs, lr 0.02).
- gaussian_images made small: 3x8x8 images (2,000 training, 1,000 validation, 5,000 test),
  resnet8 -> cnn_student, no augmentation, so that the transfer set is exactly the inputs whose p*
  is known; converged budget only. The paper-scale study runs the same protocol with the preset
  `gaussian_images-gpu` (50,000 32x32 images, resnet32x4 -> resnet8x4, crops with padding 2):
  `python studies/effect_map.py run --gpu`.

Reported (docs/effect-map.md): the table `bayeskd compare --runs reports/effect_map/runs.csv
--select teacher.optim.lr:teacher.val_nll --wide --format md` recomputes from the archived runs,
paired 95% t-intervals, and Holm's correction over all its paired comparisons.

    python studies/effect_map.py run [gaussian] [images] [--gpu]   # every phase, waiting for the queue
    python studies/effect_map.py queue PHASE [gaussian] [images]   # one phase: select, main or more
    python studies/effect_map.py archive          # reports/effect_map/runs.csv: the archived runs
                                                  # and the experiments

A phase queues only the runs that are neither done (an experiment, or a run of the archive) nor
queued, so `run` resumes where it stopped, and a fresh clone goes on from the committed archive;
`archive` adds the experiments to the runs already archived.

Run it in a clone of its own: two queue workers share two cores, each stage on compute.threads (1) thread.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from bayeskd import config, report
from bayeskd.io import write_text

LOSSES = ("ce", "mse", "ce_ts")
LRS = (0.01, 0.03, 0.1)
TEMPERATURES = (4.0, 1.0)  # T = 4 first: the T = 1 runs then find their teachers in DVC's run cache
SEEDS, MORE_SEEDS = (0, 1, 2), (3, 4)
SELECT = report.Selection("teacher.optim.lr", "teacher.val_nll")
ARCHIVE = "reports/effect_map/runs.csv"
WORKERS = 2


def budget(epochs: int) -> dict[str, object]:
    return {"teacher.optim.epochs": epochs, "teacher.optim.milestones": [epochs * 3 // 4]}


RECIPE = {"teacher.optim.batch_size": 64, "teacher.optim.momentum": 0.9, "teacher.optim.weight_decay": 0.0005,
          "teacher.optim.gamma": 0.1, "student.method": "kd", "student.kd.ce_weight": 0.1,
          "student.kd.kd_weight": 0.9}
SMALL_IMAGES = {
    "data.name": "gaussian_images", "data.gaussian_images.n_train": 2000, "data.gaussian_images.n_val": 1000,
    "data.gaussian_images.n_test": 5000, "data.gaussian_images.image_size": 8,
    "data.gaussian_images.smoothness": 1.0, "data.gaussian_images.margin": 1, "data.augment.padding": 0,
    "teacher.net": "resnet8", "student.net": "cnn_student", "student.optim.epochs": 20,
    "student.optim.lr": 0.05, "student.optim.milestones": [15], "cache.views": "all"}
# data set -> (its fixed overrides, {budget name: overrides}); the first budget is the converged one
STUDIES = {
    "gaussian": ({"data.name": "gaussian"}, {"converged": budget(160), "overfit": budget(320)}),
    "images": (SMALL_IMAGES, {"converged": budget(60)}),
}
# paper scale, on a GPU: the gaussian_images-gpu preset with its own budget (240 epochs, x0.1 after
# 150, 180 and 210), plus a validation split to choose the learning rate on and fit ce_ts's T
GPU_STUDIES = {"images-gpu": ({**config.preset("gaussian_images-gpu"), "data.gaussian_images.n_val": 5000},
                              {"converged": {}})}


@dataclass(frozen=True)
class Cell:
    study: str
    budget: str
    temperature: float

    def overrides(self, studies: dict) -> dict[str, object]:
        fixed, budgets = studies[self.study]
        return {**RECIPE, **fixed, **budgets[self.budget], "student.kd.temperature": self.temperature}

    def holds(self, run: report.Run, studies: dict) -> bool:
        flat = report.flatten(run.params)
        return all(json.dumps(flat.get(k)) == json.dumps(v) for k, v in self.overrides(studies).items()
                   if k not in ("teacher.optim.lr",))


def cells(studies: dict) -> list[Cell]:
    return [Cell(s, b, t) for t in TEMPERATURES for s, (_, budgets) in studies.items() for b in budgets]


def experiments() -> list[report.Run]:
    return [r for r in report.collect() if r.origin.startswith("experiments of ")]


def archived(studies: dict) -> list[report.Run]:
    """The archive's runs, each with all its parameters. The archive keeps only the parameters that
    tell its runs apart: one it leaves out had a single value in all of them, the study's where the
    study sets it, else params.yaml's (unchanged since the study began)."""
    if not os.path.exists(ARCHIVE):
        return []
    shared = {k: v for cell in cells(studies) for k, v in cell.overrides(studies).items()}
    defaults = config.read(config.PARAMS_FILE)
    return [replace(r, params=config.with_overrides(defaults, shared | report.flatten(r.params), ARCHIVE))
            for r in report.read_runs(ARCHIVE)]


def pending() -> list[report.Run]:
    """The queued and running experiments (their parameters; no metrics yet)."""
    shown = json.loads(report.dvc("exp", "show", "--json"))
    return [report.Run(node.get("name", ""), node["data"]["params"]["params.yaml"]["data"], {})
            for top in shown for exp in top.get("experiments") or []
            if (exp.get("executor") or {}).get("state") in ("queued", "running")
            for node in exp.get("revs") or []]


def done(runs: list[report.Run], cell: Cell, loss: str, lr: float, seed: int, studies: dict) -> bool:
    return any(cell.holds(r, studies) and r.params["teacher"]["loss"] == loss and r.params["seed"] == seed
               and r.params["teacher"]["optim"]["lr"] == lr for r in runs)


def chosen_rates(runs: list[report.Run], studies: dict) -> dict[tuple[str, str], float]:
    """(study, loss) -> the learning rate the selection runs chose (SELECT, as `bayeskd compare`)."""
    out = {}
    for study in studies:
        selection = Cell(study, next(iter(studies[study][1])), TEMPERATURES[0])
        for loss in LOSSES:
            by_value = {}
            for r in runs:
                if selection.holds(r, studies) and r.params["teacher"]["loss"] == loss:
                    lr = json.dumps(r.params["teacher"]["optim"]["lr"])
                    by_value.setdefault(lr, {})[r.params["seed"]] = r
            if len(by_value) < len(LRS):
                raise SystemExit(f"error: {study}, {loss}: the selection runs are not all done "
                                 f"({len(by_value)} of {len(LRS)} rates); run `queue select` first")
            out[study, loss] = json.loads(SELECT.choose(by_value))
    return out


def needs_more_seeds(runs: list[report.Run], cell: Cell, rates: dict, studies: dict) -> bool:
    """Whether a paired student difference of the cell is within two standard deviations of zero."""
    mine = [r for r in runs if cell.holds(r, studies)
            and r.params["teacher"]["optim"]["lr"] == rates[cell.study, r.params["teacher"]["loss"]]]
    for row in report.summarise(mine, SELECT):
        for key in ("student.accuracy", "student.bcpd_mse", "student.ece"):
            d = row.diffs.get(key, [])
            if len(d) > 1 and abs(statistics.fmean(d)) < 2 * statistics.stdev(d):
                return True
    return False


def wanted(phase: str, runs: list[report.Run], studies: dict) -> list[tuple[Cell, str, float, int]]:
    """The (cell, loss, learning rate, seed) runs a phase asks for, given the runs done before it."""
    if phase == "select":
        return [(Cell(s, next(iter(b)), TEMPERATURES[0]), loss, lr, SEEDS[0])
                for s, (_, b) in studies.items() for loss in LOSSES for lr in LRS]
    rates, out = chosen_rates(runs, studies), []
    for cell in cells(studies):
        more = phase == "more" and needs_more_seeds(runs, cell, rates, studies)
        seeds = SEEDS if phase == "main" else MORE_SEEDS if more else ()
        out += [(cell, loss, rates[cell.study, loss], seed) for seed in seeds for loss in LOSSES]
    return out


def plan(phase: str, studies: dict) -> list[tuple[Cell, str, float, int]]:
    """The runs of a phase that are neither done nor queued."""
    runs, queued = experiments() + archived(studies), pending()
    return [w for w in wanted(phase, runs, studies)
            if not done(runs, *w, studies) and not done(queued, *w, studies)]


def start_workers() -> None:
    """Start the missing ones of queue workers 1..WORKERS (DVC names them by number). Their output
    goes to DVC's worker logs; they stop when the queue is empty."""
    subprocess.run(["dvc", "queue", "start", "-j", str(WORKERS)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def queue(phase: str, studies: dict, start: bool = False) -> int:
    """Queue the phase's runs that are not done; with `start`, the workers start on the first."""
    todo = plan(phase, studies)
    for i, (cell, loss, lr, seed) in enumerate(todo):
        overrides = cell.overrides(studies) | {"teacher.loss": loss, "teacher.optim.lr": lr, "seed": seed}
        command = ["dvc", "exp", "run", "--queue", "evaluate", *config.override_args(overrides)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, capture_output=True)
        if start and i == 0:
            start_workers()
    print(f"{phase}: queued {len(todo)} runs", flush=True)
    return len(todo)


def wait(poll: float = 60) -> None:
    """Until the queue is empty, keeping WORKERS workers (one can stop early: DVC's file-system queue
    occasionally loses a worker)."""
    while True:
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout
        queued, running = status.count(" Queued"), status.count(" Running")
        if not queued and not running:
            failed = status.count(" Failed")
            print(f"queue empty ({failed} failed)" if failed else "queue empty", flush=True)
            return
        active = re.search(r"Worker status: (\d+) active", status)
        workers = int(active.group(1)) if active else 0
        if queued and workers < WORKERS:
            start_workers()
        print(time.strftime("%H:%M:%S"), f"{running} running, {queued} queued", flush=True)
        time.sleep(poll)


def main(argv: list[str]) -> None:
    studies = GPU_STUDIES if "--gpu" in argv else STUDIES
    argv = [a for a in argv if a != "--gpu"]
    if chosen := [a for a in argv if a in studies]:  # some of the studies only
        studies = {k: v for k, v in studies.items() if k in chosen}
        argv = [a for a in argv if a not in chosen]
    if argv[:1] == ["run"]:
        for phase in ("select", "main", "more"):
            start = time.time()
            queue(phase, studies, start=True)
            wait()  # also for runs an earlier invocation queued
            print(f"{phase}: {time.time() - start:.0f} s", flush=True)
    elif argv[:1] == ["queue"] and argv[1:] and argv[1] in ("select", "main", "more"):
        queue(argv[1], studies)
    elif argv == ["archive"]:
        write_text(ARCHIVE, report.runs_csv(report.unique(archived(studies) + experiments())))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
