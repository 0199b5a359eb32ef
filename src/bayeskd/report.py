"""Comparisons across DVC experiments and commits: CE- vs MSE-trained teachers, over seeds.

Runs are read from `dvc exp show --json` (params and metrics per revision), or from a CSV archive
of runs (`runs_csv`, `read_runs`). Runs are grouped into configurations: all parameters except
`teacher.loss`, `seed` and `export.*` (and a `Selection`'s parameter, chosen per configuration and
loss). Within a configuration each teacher loss's metrics are summarised over seeds, and every
other loss is compared with CE by the paired differences over the seeds both have (student
accuracy, bcpd_mse and ECE; the teacher's distance to p* on the transfer set), each with a 95%
Student-t interval; Holm's correction runs over all of a table's paired comparisons.

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


class ReportError(ValueError):
    """An archive or an option that cannot be read; the message names it and what is expected."""


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


# the parameters that name a configuration (its label) and tell runs of one apart
LABEL_KEYS = ("data.name", "teacher.net", "student.net", "student.method")


def runs_csv(runs: list[Run]) -> str:
    """The runs as one CSV table, the archive that `read_runs` reads back: per run, its name and
    origin, every parameter that differs between the runs or names its configuration (`params.*`;
    strings as they are, other values as JSON) and all its metrics (`metrics.*`)."""
    params = [flatten(r.params) for r in runs]
    shown = {k for k in set().union(*params) if len({json.dumps(p.get(k)) for p in params}) > 1}
    param_keys = sorted(shown | {k for k in (*LABEL_KEYS, *VARIED) if any(k in p for p in params)})
    metrics = [flatten(r.metrics) for r in runs]
    metric_keys = sorted(set().union(*metrics))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rev", "origin", *(f"params.{k}" for k in param_keys),
                *(f"metrics.{k}" for k in metric_keys)])
    text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    for r, p, m in zip(runs, params, metrics, strict=True):
        w.writerow([r.rev, r.origin, *("" if k not in p else text(p[k]) for k in param_keys),
                    *("" if k not in m else repr(m[k]) for k in metric_keys)])
    return buf.getvalue()


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        *parents, key = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return out


def _param(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_runs(path: str | Path) -> list[Run]:
    """The runs of an archive written by `runs_csv`; ReportError naming the file if it is not one."""
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    expected = f"expected an archive of runs, as `bayeskd compare --save-runs {path}` writes"
    if not table or not {"rev", "origin", "params.seed", "params.teacher.loss"} <= set(table[0]):
        raise ReportError(f"{path}: no runs, or not the columns of an archive; {expected}")
    runs = []
    for i, line in enumerate(table, start=2):
        try:
            params = {k.removeprefix("params."): _param(v) for k, v in line.items()
                      if k.startswith("params.") and v}
            metrics = {k.removeprefix("metrics."): float(v) for k, v in line.items()
                       if k.startswith("metrics.") and v}
        except (ValueError, TypeError, AttributeError):  # a short or long line, a metric not a number
            raise ReportError(f"{path}, line {i}: damaged; {expected}") from None
        runs.append(Run(line["rev"], _nest(params), _nest(metrics), line["origin"]))
    return runs


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


def config_key(params: dict, ignore: tuple[str, ...] = ()) -> tuple:
    """The configuration of a run: every parameter except teacher.loss, seed, export.* and `ignore`."""
    flat = flatten(params)
    return tuple(sorted((k, json.dumps(v)) for k, v in flat.items()
                        if k not in VARIED + ignore and not k.startswith("export.")))


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% Student-t interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def p_value(values: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test that the mean difference is 0; None under two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(len(values))), len(values) - 1))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of the hypotheses are rejected at family-wise level alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


# The metrics compared with the CE teacher's, paired over seeds: the teacher on the transfer set at
# the distillation temperature, and the student's accuracy, distance to p* and calibration.
PAIRED = ("teacher.transfer_bcpd_mse_at_t", "student.accuracy", "student.bcpd_mse", "student.ece")


@dataclass
class Row:
    """One teacher loss in one configuration: its runs' flattened metrics, one per seed, and for a
    loss other than CE the paired differences to the CE teacher's runs of the same seeds."""

    config: str
    loss: str
    seeds: list[int]
    metrics: list[dict[str, float]]
    diffs: dict[str, list[float]] = field(default_factory=dict)  # PAIRED key -> this loss - ce, per seed
    revs: list[str] = field(default_factory=list)
    selected: object = None  # the value of the `select`ed parameter these runs have
    holm: dict[str, bool] = field(default_factory=dict)  # PAIRED key -> survives Holm's correction

    def mean(self, key: str) -> float | None:
        return _mean([m.get(key) for m in self.metrics])

    @property
    def student_accuracy(self) -> list[float]:
        return [m["student.accuracy"] for m in self.metrics]

    @property
    def diff(self) -> list[float]:
        return self.diffs.get("student.accuracy", [])


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# data.<section>.* parameters belong to the datasets read through that section
DATA_SECTIONS = {"gaussian": "gaussian", "gaussian_images": "gaussian_images", "digits": "digits",
                 "cifar10": "images", "cifar100": "images", "imagefolder": "images"}


def _label(params: dict, varying: set[str]) -> str:
    flat = flatten(params)
    base = (f"{flat['data.name']}: {flat['teacher.net']} -> {flat['student.net']} "
            f"({flat['student.method']})")
    others = {f"data.{s}." for s in set(DATA_SECTIONS.values()) - {DATA_SECTIONS.get(flat["data.name"])}}
    extra = ", ".join(f"{k}={flat[k]}" for k in sorted(varying - set(LABEL_KEYS))
                      if k in flat and not k.startswith(tuple(others)))
    return f"{base} {extra}".strip()


@dataclass(frozen=True)
class Selection:
    """Per configuration and teacher loss, keep the runs at the value of `param` whose runs have the
    lowest mean of `metric` over the seeds that every value was run with (e.g. the learning rate
    with the lowest validation NLL of the teacher)."""

    param: str
    metric: str

    @classmethod
    def parse(cls, text: str) -> Selection:
        param, _, metric = text.partition(":")
        if not (param and metric):
            raise ReportError(f"--select {text!r}: expected PARAM:METRIC, e.g. "
                             "teacher.optim.lr:teacher.val_nll")
        return cls(param, metric)

    def choose(self, by_value: dict[str, dict[int, Run]]) -> str:
        common = set.intersection(*(set(runs) for runs in by_value.values()))
        if not common:
            raise ReportError(f"--select {self.param}: its values {sorted(by_value)} share no seed to "
                             "compare them on")
        scores = {}
        for value, runs in by_value.items():
            found = [flatten(runs[s].metrics).get(self.metric) for s in sorted(common)]
            if None in found:
                raise ReportError(f"--select: run {runs[min(common)].rev} has no metric {self.metric!r}")
            scores[value] = statistics.fmean(found)
        return min(scores, key=scores.get)


def summarise(runs: list[Run], select: Selection | None = None) -> list[Row]:
    """Rows per configuration and teacher loss, with the paired differences to CE; with `select`,
    its parameter is chosen per configuration and loss instead of telling configurations apart.
    Holm's correction runs over every paired comparison the rows hold."""
    ignore = (select.param,) if select else ()
    groups: dict[tuple, dict[str, dict[str, dict[int, Run]]]] = {}  # key -> loss -> value -> seed
    example: dict[tuple, dict] = {}
    for r in unique(runs):
        key = (config_key(r.params, ignore), r.source)
        example.setdefault(key, r.params)
        value = json.dumps(flatten(r.params).get(select.param)) if select else ""
        groups.setdefault(key, {}).setdefault(r.params["teacher"]["loss"], {}).setdefault(value, {})[
            int(r.params["seed"])] = r
    # name configurations by the parameters that tell them apart
    values: dict[str, set] = {}
    for config, _ in groups:
        for k, v in config:
            values.setdefault(k, set()).add(v)
    varying = {k for k, v in values.items() if len(v) > 1}

    rows = []
    for key, by_loss in groups.items():
        label = _label(example[key], varying) + (f" [{key[1]}]" if key[1] else "")
        chosen = {loss: by_value[select.choose(by_value) if select else ""]
                  for loss, by_value in by_loss.items()}
        for loss in sorted(chosen, key=lambda x: (x != "ce", x)):
            seeds = sorted(chosen[loss])
            flat = [flatten(chosen[loss][s].metrics) for s in seeds]
            row = Row(label, loss, seeds, flat, revs=[chosen[loss][s].rev for s in seeds],
                      selected=flatten(chosen[loss][seeds[0]].params).get(select.param) if select else None)
            if loss != "ce" and "ce" in chosen:
                ce = {s: flatten(r.metrics) for s, r in chosen["ce"].items()}
                for k in PAIRED:
                    d = [f[k] - ce[s][k] for s, f in zip(seeds, flat, strict=True)
                         if s in ce and k in f and k in ce[s]]
                    if d:
                        row.diffs[k] = d
            rows.append(row)
    family = [(row, k) for row in rows for k, d in row.diffs.items() if len(d) > 1]
    for (row, k), kept in zip(family, holm([p_value(row.diffs[k]) for row, k in family]), strict=True):
        row.holm[k] = kept
    return rows


def comparisons(rows: list[Row]) -> int:
    """How many paired comparisons (with an interval) the rows hold: Holm's family."""
    return sum(len(row.holm) for row in rows)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean_sd(row: Row, key: str) -> str:
    xs = [m[key] for m in row.metrics if key in m]
    if not xs:
        return "-"
    return _fmt(statistics.fmean(xs)) + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def _diff(row: Row, key: str, wide: bool) -> str:
    d = row.diffs.get(key)
    if not d:
        return ""
    ci = t_interval(d)
    mark = "*" if row.holm.get(key) else ""
    if ci is None:
        return f"{statistics.fmean(d):+.4f}" + (" (n=1)" if wide else "")
    if wide:
        return f"{statistics.fmean(d):+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]{mark} (n={len(d)})"
    return f"{statistics.fmean(d):+.4f}±{(ci[1] - ci[0]) / 2:.4f}{mark}"


# Each column by its short name (the narrow table's header): its wide header and its cell (given the
# row and whether the table is wide). NARROW are the columns of the default table, which fits 120
# characters; WIDE those of `--wide`.
COLUMNS = {
    "configuration": ("configuration", lambda r, w: r.config),
    "loss": ("teacher loss", lambda r, w: r.loss),
    "n": ("seeds", lambda r, w: str(len(r.seeds))),
    "sel": ("selected", lambda r, w: "" if r.selected is None else str(r.selected)),
    "t.acc": ("teacher acc", lambda r, w: _fmt(r.mean("teacher.accuracy"), 4 if w else 3)),
    "t.ece": ("teacher ECE", lambda r, w: _fmt(r.mean("teacher.ece"), 4 if w else 3)),
    "t.p*": ("teacher bcpd_mse", lambda r, w: _fmt(r.mean("teacher.bcpd_mse"))),
    "t.val_nll": ("teacher val NLL", lambda r, w: _fmt(r.mean("teacher.val_nll"))),
    "t.train_acc": ("teacher train acc", lambda r, w: _fmt(r.mean("teacher.train_accuracy"))),
    "t.plateau": ("teacher plateau", lambda r, w: _fmt(r.mean("teacher.plateau"))),
    "t.T_cal": ("teacher calibration T", lambda r, w: _fmt(r.mean("teacher.calibration_temperature"), 3)),
    "t.p*tr": ("teacher transfer bcpd_mse", lambda r, w: _fmt(r.mean("teacher.transfer_bcpd_mse"))),
    "T": ("KD T", lambda r, w: _fmt(r.mean("distill_temperature"), 1)),
    "t.p*@T": ("teacher transfer bcpd_mse at T", lambda r, w: _fmt(r.mean("teacher.transfer_bcpd_mse_at_t"),
                                                                    4 if w else 3)),
    "Δt.p*@T": ("teacher transfer bcpd_mse at T vs ce",
                lambda r, w: _diff(r, "teacher.transfer_bcpd_mse_at_t", w)),
    "s.acc": ("student acc (mean ± sd)", lambda r, w: _mean_sd(r, "student.accuracy")),
    "Δs.acc": ("student acc vs ce: paired diff [95% t-interval]",
               lambda r, w: _diff(r, "student.accuracy", w)),
    "s.p*": ("student bcpd_mse", lambda r, w: _fmt(r.mean("student.bcpd_mse"))),
    "Δs.p*": ("student bcpd_mse vs ce", lambda r, w: _diff(r, "student.bcpd_mse", w)),
    "s.ece": ("student ECE", lambda r, w: _fmt(r.mean("student.ece"))),
    "Δs.ece": ("student ECE vs ce", lambda r, w: _diff(r, "student.ece", w)),
}
NARROW = ("loss", "n", "sel", "t.acc", "t.ece", "t.p*@T",
          "s.acc", "Δs.acc", "s.p*", "Δs.p*", "s.ece", "Δs.ece")
WIDE = ("configuration", "loss", "n", "sel",
        "t.acc", "t.ece", "t.p*", "t.val_nll", "t.train_acc", "t.plateau", "t.T_cal", "t.p*tr", "T", "t.p*@T",
        "Δt.p*@T", "s.acc", "Δs.acc", "s.p*", "Δs.p*", "s.ece", "Δs.ece")


def _columns(rows: list[Row], wide: bool) -> list[str]:
    """The columns to show: those with a value in some row (the selected parameter only if any)."""
    names = WIDE if wide else NARROW
    return [c for c in names if c in ("configuration", "loss", "n")
            or any(COLUMNS[c][1](r, wide) not in ("", "-") for r in rows)]


def legend(rows: list[Row], wide: bool) -> str:
    """What the marks and intervals mean, and the size of Holm's family ('' without differences)."""
    if not any(row.diffs for row in rows):
        return ""
    interval = "[95% t-interval]" if wide else "±half-width of the 95% t-interval"
    return (f"Paired differences to the CE teacher's runs of the same seeds: mean {interval}. "
            f"{comparisons(rows)} paired comparison{'' if comparisons(rows) == 1 else 's'} with an interval; "
            "* marks those that survive Holm's correction at family-wise 0.05.\n")


def to_markdown(rows: list[Row], wide: bool = False) -> str:
    names = _columns(rows, wide)
    names = names if "configuration" in names else ["configuration", *names]
    header = [COLUMNS[c][0] if wide else c for c in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(COLUMNS[c][1](r, wide) for c in names) + " |" for r in rows]
    note = legend(rows, wide)
    return "\n".join(lines) + "\n" + (f"\n{note}" if note else "")


def to_table(rows: list[Row], wide: bool = False) -> str:
    """Aligned text. Narrow (the default): each configuration is a heading line above its rows,
    short column names, intervals as ±half-widths, so that it fits 120 columns."""
    import textwrap

    names = _columns(rows, wide)
    header = [COLUMNS[c][0] if wide else c for c in names]
    body = [[COLUMNS[c][1](r, wide) for c in names] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(names))]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()  # noqa: E731
    out = [fmt(header), "  ".join("-" * w for w in widths)]
    for i, (row, line) in enumerate(zip(rows, body, strict=True)):
        if not wide and (i == 0 or rows[i - 1].config != row.config):
            out += textwrap.wrap(row.config, 120, subsequent_indent="    ")
        out.append(fmt(line))
    note = legend(rows, wide)
    return "\n".join(out) + "\n" + (textwrap.fill(note, 120) + "\n" if note else "")


CSV_MEANS = ("teacher.accuracy", "teacher.ece", "teacher.bcpd_mse", "teacher.val_nll",
             "teacher.train_accuracy", "teacher.plateau", "teacher.calibration_temperature",
             "teacher.transfer_bcpd_mse", "distill_temperature", "teacher.transfer_bcpd_mse_at_t",
             "student.bcpd_mse", "student.ece")


def _csv_diff(row: Row, key: str) -> list:
    """mean, interval low and high, n, Holm ('' where there is none)."""
    d = row.diffs.get(key)
    if not d:
        return [""] * 5
    ci = t_interval(d) or ("", "")
    return [statistics.fmean(d), *ci, len(d), row.holm.get(key, "")]


def to_csv(rows: list[Row], wide: bool = False) -> str:
    """Every number of every row, one column each (the same whatever `wide`). The student accuracy's
    paired difference is `diff_vs_ce_*`; the other paired metrics' are `<metric>_diff_*`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    others = [k for k in PAIRED if k != "student.accuracy"]
    w.writerow(["configuration", "teacher_loss", "seeds", "selected",
                *(k.replace(".", "_") for k in CSV_MEANS), "student_accuracy_mean", "student_accuracy_sd",
                *(f"diff_vs_ce_{x}" for x in ("mean", "ci_low", "ci_high", "n", "holm")),
                *(f"{k.replace('.', '_')}_diff_{x}" for k in others
                  for x in ("mean", "ci_low", "ci_high", "n", "holm"))])
    for r in rows:
        acc = r.student_accuracy
        w.writerow([r.config, r.loss, len(r.seeds), "" if r.selected is None else r.selected,
                    *("" if r.mean(k) is None else r.mean(k) for k in CSV_MEANS), statistics.fmean(acc),
                    statistics.stdev(acc) if len(acc) > 1 else "", *_csv_diff(r, "student.accuracy"),
                    *(x for k in others for x in _csv_diff(r, k))])
    return buf.getvalue()


FORMATS = {"table": to_table, "md": to_markdown, "csv": to_csv}
DVC_PLOTS_HEADER = ("# Written by `bayeskd compare --plot`: DVC plots of points.csv, one point per run "
                    "(template .dvc/plots/by_teacher_loss.json).\n")


MARKERS = {"ce": "o", "mse": "s", "ls": "^", "ce_ts": "D"}


def plot(runs: list[Run], directory: str | Path, select: Selection | None = None) -> Path:
    """Student accuracy against teacher bcpd_mse and teacher ECE, one point per run: a PNG, the
    points as CSV, and beside them a dvc.yaml declaring the same charts as DVC plots (colour =
    teacher loss), so `dvc plots show` draws them wherever the directory is in the project. Also
    the effect map's figure of the rows (`effect_plot`), with `select` as in `summarise`."""
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
        for loss, marker in MARKERS.items():
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
    effect_plot(summarise(runs, select), directory / "gain_vs_gap.png")
    return png


# the teacher's distance to p* that the figure's x axis measures: on the transfer set at the
# distillation temperature where evaluate reports it, else on the test split
GAPS = {"teacher.transfer_bcpd_mse_at_t": "on the transfer set at the KD temperature",
        "teacher.bcpd_mse": "on the test split"}


def gain_vs_gap(rows: list[Row]) -> list[dict]:
    """Per configuration and teacher loss other than CE: how much closer to p* its teacher is than the
    CE teacher (the difference of the mean distances named in GAPS; negative: closer), and the
    paired student difference with its 95% interval. Configurations without p* or without paired CE
    runs have no point."""
    ce = {r.config: r for r in rows if r.loss == "ce"}
    points = []
    for r in rows:
        base = ce.get(r.config)
        if r.loss == "ce" or not r.diff or base is None:
            continue
        key = next((k for k in GAPS if r.mean(k) is not None and base.mean(k) is not None), None)
        if key is None:
            continue
        ci = t_interval(r.diff)
        points.append({"config": r.config, "loss": r.loss, "gap": r.mean(key) - base.mean(key), "on": key,
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
    for loss, marker in MARKERS.items():
        pts = [p for p in points if p["loss"] == loss]
        if not pts:
            continue
        errors = [[p["gain"] - p["low"] if p["low"] is not None else 0 for p in pts],
                  [p["high"] - p["gain"] if p["high"] is not None else 0 for p in pts]]
        ax.errorbar([p["gap"] for p in pts], [p["gain"] for p in pts], yerr=errors, fmt=marker,
                    capsize=3, alpha=0.85, label=f"{loss} teacher vs ce teacher")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    where = " or ".join(GAPS[k] for k in GAPS if any(p["on"] == k for p in points))
    ax.set_xlabel(f"teacher's bcpd_mse {where}\nminus the CE teacher's (left: closer to p*)")
    ax.set_ylabel("student accuracy minus the CE teacher's student\n(paired over seeds, 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(png)
