"""Comparisons across DVC experiments and commits: CE- vs MSE-trained teachers, over seeds.

Runs are read from `dvc exp show --json` (params and metrics per revision). Runs are grouped into
configurations: all parameters except `teacher.loss`, `seed` and `export.*`. Within a configuration
the student accuracy of each teacher loss is summarised over seeds, and MSE is compared with CE by
the paired difference over the seeds both have, with a 95% Student-t interval.

Runs with the same parameters but different metrics come from other code or another machine (CPU
training repeats bit for bit only on the same machine). They are not pooled, nor dropped: their
configuration is shown once per origin (the workspace, a commit, or the experiments of a commit),
each labelled with it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from bayeskd.io import run
from bayeskd.tracking import flatten

METRICS_FILE = "reports/metrics.json"
VARIED = ("teacher.loss", "seed")


@dataclass
class Run:
    rev: str
    params: dict
    metrics: dict
    origin: str = ""  # "workspace", a commit's name, or "experiments of <commit's name>"
    source: str = ""  # set to the origin where runs of its parameters disagree (see `unique`)


def dvc(*args: str, repo: str | Path = ".") -> str:
    return run([sys.executable, "-m", "dvc", *args], repo)


def _name(node: dict) -> str:
    rev = str(node.get("rev", ""))
    return node.get("name") or (rev[:7] if len(rev) == 40 else rev)


def runs_in(exp_show: list) -> list[Run]:
    """Every revision with params and metrics in `dvc exp show --json` output: the workspace, the
    commits, and each commit's finished experiments (DVC shows a queued or running experiment with
    its own params but its baseline's metrics)."""
    found: list[Run] = []

    def add(node: dict, origin: str) -> None:
        data = node.get("data") or {}
        metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params:
            found.append(Run(_name(node), params, metrics, origin))

    for top in exp_show:
        add(top, _name(top))
        for exp in top.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue
            for node in exp.get("revs") or []:
                add(node, f"experiments of {_name(top)}")
    return found


def collect(repo: str | Path = ".", revs: tuple[str, ...] = (), all_commits: bool = False) -> list[Run]:
    """The workspace and experiments of HEAD by default; of `revs`, or of every commit, if given."""
    args = ["exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    for r in revs:
        args += ["--rev", r]
    return runs_in(json.loads(dvc(*args, repo=repo)))


def pull_experiments(remote: str, repo: str | Path = ".", revs: tuple[str, ...] = (),
                     all_commits: bool = False) -> None:
    """The experiments of `revs` (default HEAD), or of every commit, from git remote `remote`:
    `dvc exp pull`, as `git fetch` does not bring them. Their outputs stay in the DVC remote."""
    args = ["exp", "pull", "--no-cache", remote] + (["--all-commits"] if all_commits else [])
    for r in revs:
        args += ["--rev", r]
    dvc(*args, repo=repo)


def _compare_command(a: Run, b: Run) -> str:
    """What shows two runs' differences (`dvc exp diff REV` compares REV with the workspace)."""
    return " ".join(["dvc", "exp", "diff", *(r.rev for r in (a, b) if r.rev != "workspace")])


def unique(runs: list[Run]) -> list[Run]:
    """One run per (configuration, teacher loss, seed, source). A revision listed twice (the
    workspace and the commit or experiment it holds) counts once. Where runs of the same parameters
    from different origins have different metrics (other code, or another machine), every run of
    that configuration gets its origin as `source`, so that summarise() shows each origin in rows
    of its own, and a warning says so; two such runs of the same origin (two experiments) keep the
    first. Both warnings name the command that compares the two runs."""
    distinct: dict[tuple, list[Run]] = {}
    # of identical runs keep an experiment's, else a commit's: the workspace holds a copy of either
    for r in sorted(runs, key=lambda r: (r.origin == "workspace", not r.origin.startswith("experiments"))):
        key = (config_key(r.params), r.params["teacher"]["loss"], int(r.params["seed"]), r.source)
        same = distinct.setdefault(key, [])
        if all(o.metrics != r.metrics for o in same):
            same.append(r)
    clashes = {key[0]: rs for key, rs in distinct.items() if len({r.origin for r in rs}) > 1}
    kept: dict[tuple, Run] = {}
    for key, rs in distinct.items():
        for r in rs:
            source = r.origin if key[0] in clashes else r.source
            if (*key, source) in kept:
                first = kept[(*key, source)]
                warnings.warn(f"{first.rev} and {r.rev} have the same parameters and origin "
                              f"({r.origin}) but different metrics; using {first.rev} (compare them: "
                              f"`{_compare_command(first, r)}`)", stacklevel=2)
            else:
                kept[(*key, source)] = replace(r, source=source)
    for a, *others in clashes.values():
        b = next(r for r in others if r.origin != a.origin)
        warnings.warn(f"{a.rev} and {b.rev} have the same parameters but different metrics (other "
                      "code, or another machine): their runs are shown apart, in rows labelled by "
                      f"origin (compare them: `{_compare_command(a, b)}`)", stacklevel=2)
    return list(kept.values())


def config_key(params: dict) -> tuple:
    flat = flatten(params)
    return tuple(sorted((k, json.dumps(v)) for k, v in flat.items()
                        if k not in VARIED and not k.startswith("export.")))


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% Student-t interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class Row:
    config: str
    loss: str
    seeds: list[int]
    teacher_accuracy: float
    teacher_ece: float
    teacher_bcpd_mse: float | None
    student_accuracy: list[float]
    diff: list[float] = field(default_factory=list)  # paired student accuracy, this loss - ce
    revs: list[str] = field(default_factory=list)


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _label(params: dict, varying: set[str]) -> str:
    flat = flatten(params)
    base = (f"{flat['data.name']}: {flat['teacher.net']} -> {flat['student.net']} "
            f"({flat['student.method']})")
    extra = ", ".join(f"{k}={flat[k]}" for k in sorted(varying) if k in flat)
    return f"{base} {extra}".strip()


def summarise(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, dict[str, dict[int, Run]]] = {}
    example: dict[tuple, dict] = {}
    for r in unique(runs):
        key = (config_key(r.params), r.source)
        example.setdefault(key, r.params)
        groups.setdefault(key, {}).setdefault(r.params["teacher"]["loss"], {})[int(r.params["seed"])] = r
    # name configurations by the parameters that tell them apart
    values: dict[str, set] = {}
    for config, _ in groups:
        for k, v in config:
            values.setdefault(k, set()).add(v)
    varying = {k for k, v in values.items() if len(v) > 1}

    rows = []
    for key, by_loss in groups.items():
        label = _label(example[key], varying) + (f" [{key[1]}]" if key[1] else "")
        for loss in sorted(by_loss, key=lambda x: (x != "ce", x)):
            seeds = sorted(by_loss[loss])
            m = [by_loss[loss][s].metrics for s in seeds]
            row = Row(label, loss, seeds,
                      _mean([x["teacher"]["accuracy"] for x in m]),
                      _mean([x["teacher"]["ece"] for x in m]),
                      _mean([x["teacher"].get("bcpd_mse") for x in m]),
                      [x["student"]["accuracy"] for x in m],
                      revs=[by_loss[loss][s].rev for s in seeds])
            if loss != "ce" and "ce" in by_loss:
                row.diff = [by_loss[loss][s].metrics["student"]["accuracy"]
                            - by_loss["ce"][s].metrics["student"]["accuracy"]
                            for s in seeds if s in by_loss["ce"]]
            rows.append(row)
    return rows


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cells(row: Row) -> list[str]:
    acc = row.student_accuracy
    student = _fmt(statistics.fmean(acc)) + (f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else "")
    if row.diff:
        ci = t_interval(row.diff)
        diff = f"{statistics.fmean(row.diff):+.4f}" + (
            f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + f" (n={len(row.diff)})"
    else:
        diff = ""
    return [row.config, row.loss, str(len(row.seeds)), _fmt(row.teacher_accuracy),
            _fmt(row.teacher_ece), _fmt(row.teacher_bcpd_mse), student, diff]


HEADER = ["configuration", "teacher loss", "seeds", "teacher acc", "teacher ECE", "teacher bcpd_mse",
          "student acc (mean ± sd)", "student acc vs ce: paired diff [95% t-interval]"]


def to_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_table(rows: list[Row]) -> str:
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["configuration", "teacher_loss", "seeds", "teacher_accuracy", "teacher_ece",
                "teacher_bcpd_mse", "student_accuracy_mean", "student_accuracy_sd", "diff_vs_ce_mean",
                "diff_vs_ce_ci_low", "diff_vs_ce_ci_high", "diff_vs_ce_n"])
    for r in rows:
        acc = r.student_accuracy
        ci = t_interval(r.diff) if r.diff else None
        w.writerow([r.config, r.loss, len(r.seeds), r.teacher_accuracy, r.teacher_ece,
                    "" if r.teacher_bcpd_mse is None else r.teacher_bcpd_mse, statistics.fmean(acc),
                    statistics.stdev(acc) if len(acc) > 1 else "",
                    statistics.fmean(r.diff) if r.diff else "", ci[0] if ci else "",
                    ci[1] if ci else "", len(r.diff) if r.diff else ""])
    return buf.getvalue()


FORMATS = {"table": to_table, "md": to_markdown, "csv": to_csv}
DVC_PLOTS_HEADER = ("# Written by `bayeskd compare --plot`: DVC plots of points.csv, one point per run "
                    "(template .dvc/plots/by_teacher_loss.json).\n")


def plot(runs: list[Run], directory: str | Path) -> Path:
    """Student accuracy against teacher bcpd_mse and teacher ECE, one point per run: a PNG, the
    points as CSV, and beside them a dvc.yaml declaring the same charts as DVC plots (colour =
    teacher loss), so `dvc plots show` draws them wherever the directory is in the project."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayeskd.io import atomic_path, write_csv, write_text

    directory = Path(directory)
    points = [{"run": r.rev, "source": r.source, "teacher_loss": r.params["teacher"]["loss"],
               "seed": r.params["seed"],
               "teacher_bcpd_mse": r.metrics["teacher"].get("bcpd_mse"),
               "teacher_ece": r.metrics["teacher"]["ece"],
               "student_accuracy": r.metrics["student"]["accuracy"]} for r in unique(runs)]
    write_csv(directory / "points.csv", points)

    panels = [("teacher_bcpd_mse", "teacher bcpd_mse (distance to p*)"), ("teacher_ece", "teacher ECE")]
    panels = [p for p in panels if any(pt[p[0]] is not None for pt in points)]
    write_text(directory / "dvc.yaml", DVC_PLOTS_HEADER + yaml.safe_dump({"plots": [
        {f"student_vs_{key}": {"template": "by_teacher_loss", "x": key, "x_label": label,
                                "y": {"points.csv": "student_accuracy"}, "y_label": "student accuracy"}}
        for key, label in panels]}, sort_keys=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for loss, marker in (("ce", "o"), ("mse", "s"), ("ls", "^")):
            pts = [p for p in points if p["teacher_loss"] == loss and p[key] is not None]
            if pts:
                ax.scatter([p[key] for p in pts], [p["student_accuracy"] for p in pts],
                           marker=marker, label=f"{loss} teacher", alpha=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("student accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Student accuracy against how well the teacher estimates p*")
    fig.tight_layout()
    png = directory / "student_vs_teacher.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    effect_plot(summarise(runs), directory / "gain_vs_gap.png")
    return png


def gain_vs_gap(rows: list[Row]) -> list[dict]:
    """Per configuration and teacher loss other than CE: how much closer to p* its teacher is than the
    CE teacher (the difference of mean bcpd_mse; negative: closer), and the paired student difference
    with its 95% interval. Configurations without p* or without paired CE runs have no point."""
    ce = {r.config: r for r in rows if r.loss == "ce"}
    points = []
    for r in rows:
        base = ce.get(r.config)
        if r.loss == "ce" or not r.diff or base is None:
            continue
        if r.teacher_bcpd_mse is None or base.teacher_bcpd_mse is None:
            continue
        ci = t_interval(r.diff)
        points.append({"config": r.config, "loss": r.loss, "gap": r.teacher_bcpd_mse - base.teacher_bcpd_mse,
                       "gain": statistics.fmean(r.diff), "low": ci[0] if ci else None,
                       "high": ci[1] if ci else None, "n": len(r.diff)})
    return points


def effect_plot(rows: list[Row], png: str | Path) -> Path | None:
    """The effect map's figure: paired student gain over the CE teacher's student (95% interval)
    against the teacher's bcpd_mse gap to the CE teacher, one point per configuration and loss."""
    points = gain_vs_gap(rows)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayeskd.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for loss, marker in (("mse", "s"), ("ls", "^")):
        pts = [p for p in points if p["loss"] == loss]
        if not pts:
            continue
        errors = [[p["gain"] - p["low"] if p["low"] is not None else 0 for p in pts],
                  [p["high"] - p["gain"] if p["high"] is not None else 0 for p in pts]]
        ax.errorbar([p["gap"] for p in pts], [p["gain"] for p in pts], yerr=errors, fmt=marker,
                    capsize=3, alpha=0.85, label=f"{loss} teacher vs ce teacher")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("teacher bcpd_mse minus the CE teacher's (left: closer to p*)")
    ax.set_ylabel("student accuracy minus the CE teacher's student\n(paired over seeds, 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(png)
