"""Great Expectations suites for a prepared dataset.

Each split becomes a pandas frame with one row per sample (label, row statistics of the input,
BCPD row sums), validated by one suite; a last suite checks that no input occurs in two splits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bayeskd.data import Dataset
from bayeskd.io import write_json


class DataValidationError(RuntimeError):
    """A prepared dataset failed an expectation; the message summarises each failure."""


def _frame(ds: Dataset, split: str) -> pd.DataFrame:
    s = ds.splits[split]
    if not (len(s.x) == len(s.y) and (s.p is None or len(s.p) == len(s.y))):
        raise DataValidationError(f"{split}: inputs, labels and probabilities differ in length")
    flat = s.x.reshape(len(s.x), int(np.prod(s.x.shape[1:])))  # also for an empty split
    finite = np.isfinite(flat).all(1)
    cols = {
        "label": s.y,
        "x_shape": [str(tuple(s.x.shape[1:]))] * len(s.y),
        "x_finite": finite,
        "x_min": np.where(finite, flat.min(1), 0.0),
        "x_max": np.where(finite, flat.max(1), 0.0),
        "x_hash": [hashlib.sha1(row.tobytes()).hexdigest() for row in flat],
    }
    if s.p is not None:
        cols |= {"p_width": np.full(len(s.y), s.p.shape[1]), "p_min": s.p.min(1), "p_sum": s.p.sum(1)}
    return pd.DataFrame(cols)


def _split_suite(gx, ds: Dataset, split: str, has_p: bool):
    E = gx.expectations
    k = ds.num_classes
    suite = gx.ExpectationSuite(name=split)
    for e in [
        E.ExpectTableRowCountToBeBetween(min_value=k),
        E.ExpectColumnValuesToBeInSet(column="x_shape", value_set=[str(tuple(ds.in_shape))]),
        E.ExpectColumnValuesToNotBeNull(column="label"),
        E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=k - 1),
        E.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(range(k))),
        E.ExpectColumnValuesToBeInSet(column="x_finite", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="x_min", min_value=ds.value_range[0]),
        E.ExpectColumnValuesToBeBetween(column="x_max", max_value=ds.value_range[1]),
    ]:
        suite.add_expectation(e)
    if has_p:
        for e in [
            E.ExpectColumnValuesToBeInSet(column="p_width", value_set=[k]),
            E.ExpectColumnValuesToBeBetween(column="p_min", min_value=0),
            E.ExpectColumnValuesToBeBetween(column="p_sum", min_value=1 - 1e-6, max_value=1 + 1e-6),
        ]:
            suite.add_expectation(e)
    return suite


def _summary(result) -> list[str]:
    lines = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        where = f"({cfg.kwargs['column']})" if "column" in cfg.kwargs else ""
        res = r.result or {}
        if "unexpected_count" in res:
            seen = f"{res['unexpected_count']} rows fail, e.g. {res.get('partial_unexpected_list', [])[:5]}"
        else:
            seen = f"observed {res.get('observed_value')}"
        lines.append(f"{result.suite_name}: {cfg.type}{where}: {seen}")
    return lines


def _compact(result) -> dict:
    """A suite's results without GX's load times and run ids, so equal data gives an equal file."""
    expectations = []
    for r in result.results:
        d = r.to_json_dict()  # JSON-safe values
        cfg = d["expectation_config"]
        expectations.append({"type": cfg["type"], "success": d["success"], "result": d["result"],
                             "kwargs": {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}})
    return {"suite": result.suite_name, "success": result.success, "expectations": expectations}


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, ctx.data_sources.add_pandas("frames")


def _run(source, checks: list[tuple[str, pd.DataFrame, object]], report: str | Path) -> None:
    """Validate each (name, frame, suite); write all results to `report`; raise on any failure."""
    results = []
    for name, frame, suite in checks:
        batch = (source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
                 .get_batch(batch_parameters={"dataframe": frame}))
        results.append(batch.validate(suite))
    write_json(report, {"success": all(r.success for r in results),
                        "suites": [_compact(r) for r in results]})
    failures = [line for r in results for line in _summary(r)]
    if failures:
        raise DataValidationError("\n".join(failures))


def validate(ds: Dataset, report: str | Path) -> None:
    """Validate every split and the disjointness of the splits; write all results to `report`.

    Raises DataValidationError with one line per failed expectation.
    """
    gx, source = _gx()
    frames = {split: _frame(ds, split) for split in ds.splits}
    checks = [(split, frame, _split_suite(gx, ds, split, ds.splits[split].p is not None))
              for split, frame in frames.items()]
    disjoint = gx.ExpectationSuite(name="splits_disjoint")
    disjoint.add_expectation(gx.expectations.ExpectColumnValuesToBeUnique(column="x_hash"))
    checks.append(("all", pd.concat([f[["x_hash"]] for f in frames.values()]), disjoint))
    _run(source, checks, report)


def validate_cache(manifest: dict, report: str | Path, min_accuracy: float) -> None:
    """The teacher-output cache's statistics, one row per shard: every value finite, the shards
    cover every sample once, and the teacher's accuracy on its own training views at least
    `min_accuracy` (a lower one means a broken teacher or mismatched labels)."""
    gx, source = _gx()
    E = gx.expectations
    m = manifest
    frame = pd.DataFrame([{"finite": s["finite"], "accuracy": s["accuracy"], "start": s["start"],
                           "samples": s["stop"] - s["start"], "files": len(s["files"])}
                          for s in m["shards"]])
    suite = gx.ExpectationSuite(name="logit_cache")
    for e in [
        E.ExpectTableRowCountToEqual(value=-(-m["num_samples"] // m["shard_size"])),
        E.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        E.ExpectColumnSumToBeBetween(column="samples", min_value=m["num_samples"],
                                     max_value=m["num_samples"]),
        E.ExpectColumnValuesToBeUnique(column="start"),
        E.ExpectColumnValuesToBeInSet(column="files", value_set=[3 if m["topk"] else 1]),
        E.ExpectColumnValuesToBeBetween(column="accuracy", min_value=min_accuracy, max_value=1),
    ]:
        suite.add_expectation(e)
    _run(source, [("cache", frame, suite)], report)
