"""The `bayeskd` command: `compare` (CE vs MSE teachers across experiments and commits), `diff` (the
Markdown that the pull-request workflow posts), `preset` (a preset as `dvc exp run` overrides),
`params` (the methods' sections of params.yaml from their declarations) and `verify` (every output
against dvc.lock, its own digest and the DVC cache)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from bayeskd import config, defaults, integrity, report
from bayeskd.io import write_text

MARKER = "<!-- bayeskd-metrics-diff -->"


def compare(args: argparse.Namespace) -> str:
    if args.runs:
        if args.revs or args.all_commits or args.save_runs or args.remote:
            raise config.ParamsError("--runs reads an archive: it takes no revisions, --all-commits, "
                                     "--save-runs or --remote")
        runs = report.read_runs(args.runs)
    else:
        if args.remote:
            report.pull_experiments(args.remote, args.repo, tuple(args.revs), args.all_commits)
        runs = report.collect(args.repo, tuple(args.revs), args.all_commits)
    if args.experiments:
        runs = [r for r in runs if r.origin.startswith("experiments of ")]
    if not runs:
        raise SystemExit("error: no runs with reports/metrics.json found; run `dvc repro` or "
                         "`dvc exp run` first")
    if args.save_runs:
        write_text(args.save_runs, report.runs_csv(report.unique(runs)))
        print(f"wrote {args.save_runs}", file=sys.stderr)
    select = report.Selection.parse(args.select) if args.select else None
    if args.plot:
        png = report.plot(runs, args.plot, select)
        print(f"wrote {png} and {args.plot}/points.csv", file=sys.stderr)
    return report.FORMATS[args.format](report.summarise(runs, select), wide=args.wide)


def _table(markdown: str) -> str:
    """DVC's Markdown table, or '' when it has no rows."""
    lines = markdown.strip().splitlines()
    return "\n".join(lines) if len(lines) > 2 else ""


def preset(args: argparse.Namespace) -> str:
    path = Path(args.repo) / config.PRESETS_FILE
    if not path.is_file():
        raise config.ParamsError(f"{path} not found: run in the project, or pass --repo")
    if args.list:
        return "".join(f"{name}: {p.get('data.name')}, {p.get('teacher.net')} -> {p.get('student.net')}\n"
                       for name, p in config.presets_in(path).items())
    if not args.name:
        raise config.ParamsError("name a preset, or list them with `bayeskd preset --list`")
    return " ".join(config.preset_args(args.name, path)) + "\n"


def params(args: argparse.Namespace) -> str:
    path = Path(args.repo) / config.PARAMS_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise config.ParamsError(f"cannot read {path}: {e.strerror or e}") from None
    synced = defaults.sync(text)
    if not args.sync:
        return synced
    if synced == text:
        return f"{path}: every section holds what the declarations give\n"

    write_text(path, synced)
    return f"{path}: the methods' and datasets' sections now hold what the declarations give\n"


def verify(args: argparse.Namespace) -> str:
    """One line per bad output file (what is wrong, the command that restores it), then one error."""
    try:
        problems, checked = integrity.verify(args.repo)
    except ValueError as e:  # no or a damaged dvc.lock, no DVC project
        raise RuntimeError(str(e)) from None
    if problems:
        print("\n".join(problems))
        raise RuntimeError(f"{len(problems)} of the {checked} output files or their copies in the DVC cache "
                           "are bad (listed above)")
    return f"{checked} output files match dvc.lock and their own digests; the DVC cache's copies are intact\n"


def diff(args: argparse.Namespace) -> str:
    revs = [args.a_rev] + ([args.b_rev] if args.b_rev else [])
    if args.remote:
        report.pull_experiments(args.remote, args.repo, tuple(revs))
    b = f"`{args.b_rev}`" if args.b_rev else "the workspace"
    params = _table(report.dvc("params", "diff", *revs, "--md", repo=args.repo))
    metrics = _table(report.dvc("metrics", "diff", *revs, "--md", repo=args.repo))
    runs = report.collect(args.repo, tuple(revs))
    return "\n".join([
        MARKER,
        f"## bayeskd: `{args.a_rev}` against {b}",
        "", "### Parameters", "", params or "No parameter changed.",
        "", "### Metrics", "", metrics or "No metric changed.",
        "", "### CE- vs MSE-trained teachers", "",
        report.to_markdown(report.summarise(runs)) if runs else "No runs with metrics.\n",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bayeskd", description=__doc__)
    parser.add_argument("--repo", default=".", help="the DVC project (default: here)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="CE vs MSE teachers across DVC experiments and commits")
    c.add_argument("revs", nargs="*", help="git revisions whose runs and experiments to read "
                   "(default: the workspace and all experiments of HEAD)")
    c.add_argument("-A", "--all-commits", action="store_true", help="read every commit")
    c.add_argument("--format", choices=sorted(report.FORMATS), default="table")
    c.add_argument("--wide", action="store_true", help="every column, intervals as [low, high] (the "
                   "default table fits 120 characters)")
    c.add_argument("--experiments", action="store_true", help="only DVC experiments, not the workspace "
                   "or the commits themselves")
    c.add_argument("--select", metavar="PARAM:METRIC", help="choose PARAM per configuration and teacher "
                   "loss: the value whose runs have the lowest mean METRIC over the seeds all values "
                   "share, e.g. teacher.optim.lr:teacher.val_nll")
    c.add_argument("--save-runs", metavar="CSV", help="also write every run (its varied parameters, "
                   "seed and metrics) to CSV, an archive that --runs reads")
    c.add_argument("--runs", metavar="CSV", help="read the runs from such an archive instead of DVC")
    c.add_argument("--plot", metavar="DIR", help="also write DIR/student_vs_teacher.png, "
                   "DIR/gain_vs_gap.png and DIR/points.csv")
    c.add_argument("--remote", metavar="GIT_REMOTE", help="first fetch the experiments of these "
                   "revisions from a git remote, e.g. origin (`dvc exp pull`)")
    c.set_defaults(run=compare)

    p = sub.add_parser("preset", help="print `dvc exp run` overrides (-S key=value ...) of a preset "
                       "from presets.yaml: dvc exp run $(bayeskd preset NAME)")
    p.add_argument("name", nargs="?")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(run=preset)

    s = sub.add_parser("params", help="params.yaml with each student.<method> section set to the method's "
                       "declared defaults and missing dataset sections added (the rest unchanged)")
    s.add_argument("--sync", action="store_true", help="write it to params.yaml instead of printing it")
    s.set_defaults(run=params)

    v = sub.add_parser("verify", help="check every output in the workspace against dvc.lock and its own "
                       "digest, and the DVC cache's copies; name each bad file and the command that "
                       "restores it (exit code 1)")
    v.set_defaults(run=verify)

    d = sub.add_parser("diff", help="Markdown: params and metrics diff plus the comparison table, "
                       "as posted on pull requests")
    d.add_argument("a_rev", help="the base revision, e.g. main")
    d.add_argument("b_rev", nargs="?", help="the new revision (default: the workspace)")
    d.add_argument("--remote", metavar="GIT_REMOTE", help="first fetch the experiments of both "
                   "revisions from a git remote, e.g. origin (`dvc exp pull`)")
    d.set_defaults(run=diff)

    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    try:
        sys.stdout.write(args.run(args))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    except (config.ParamsError, report.ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"error: cannot read or write {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
