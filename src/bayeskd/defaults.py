"""params.yaml's sections that the declarations give (`bayeskd params --sync`): each
`student.<method>` holds the method's declared defaults, one line per method, and a dataset whose
section declares a default for every key gets `data.<key>` when it is missing. Everything else in
the file (values, comments, layout) is kept as it is."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from bayeskd import config, declare
from bayeskd.datasets import DATASETS


def _scalar(value: object) -> str:
    """A value as params.yaml writes it. PyYAML reads 1e-05 as a string, so a float in exponent form
    keeps a decimal point and a signed exponent (1.0e-5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "e" in repr(value):
        mantissa, exponent = repr(value).split("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent):+d}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return json.dumps(value)  # a string, quoted


def section_line(key: str, values: Mapping[str, object]) -> str:
    """`  <key>: {name: value, ...}`, a section of a top-level block on one line."""
    return f"  {key}: {{{', '.join(f'{k}: {_scalar(v)}' for k, v in values.items())}}}"


def method_line(method: str) -> str:
    """Method `method`'s line in the `student` block: its declared defaults."""
    return section_line(method, config.hparams(method))


def _dataset_lines(datasets: Mapping[str, declare.DatasetDecl]) -> dict[str, str | None]:
    """data.<key> of every dataset: its line when its section has a default for every key, else None."""
    lines: dict[str, str | None] = {}
    for declared in datasets.values():
        section = declared.section
        complete = all(not f.is_required() for f in section.model_fields.values())
        lines[declared.key] = section_line(declared.key, section().model_dump()) if complete else None
    return lines


def _entry_end(lines: list[str], i: int, end: int) -> int:
    """The end of the entry that starts at line i of a block: a block-style entry's more indented
    lines are its own, the blank lines after it are not."""
    span = i + 1
    if re.match(r"  \w+:", lines[i]):
        while span < end and (not lines[span].strip() or lines[span].startswith("   ")):
            span += 1
        while span > i + 1 and not lines[span - 1].strip():
            span -= 1
    return span


def _sync_block(lines: list[str], block: str, wanted: Mapping[str, str | None], rewrite: bool) -> list[str]:
    """Top-level block `block` with the entries of `wanted` (key -> its line, None: cannot be
    written): with `rewrite`, those present become their line (keeping a comment at the end of a
    one-line entry); missing ones that can be written are added after the last present one."""
    start = next((i for i, line in enumerate(lines) if re.match(rf"{block}:\s*(#.*)?$", line)), None)
    if start is None:
        raise config.ParamsError(f"{config.PARAMS_FILE}: no `{block}:` block")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\S", lines[i])), len(lines))
    out, last, seen, i = lines[:start + 1], None, set(), start + 1
    while i < end:
        span = _entry_end(lines, i, end)
        key = re.match(r"  (\w+):", lines[i])
        if key and key.group(1) in wanted:
            seen.add(key.group(1))
            if rewrite and wanted[key.group(1)] is not None:
                comment = re.search(r"}\s*(#.*)$", lines[i]) if span == i + 1 else None
                out.append(wanted[key.group(1)] + (f"  {comment.group(1)}" if comment else ""))
            else:
                out.extend(lines[i:span])
            last = len(out)
        else:
            out.extend(lines[i:span])
        i = span
    missing = [line for key, line in wanted.items() if key not in seen and line is not None]
    at = last if last is not None else max(n + 1 for n, line in enumerate(out) if line.strip())
    return out[:at] + missing + out[at:] + lines[end:]


def sync(text: str, datasets: Mapping[str, declare.DatasetDecl] = DATASETS) -> str:
    """params.yaml's text with the sections the declarations give (the module docstring)."""
    lines = text.splitlines()
    methods = {m: method_line(m) for m, declared in config.METHODS.items() if declared.hparams}
    lines = _sync_block(lines, "student", methods, rewrite=True)
    lines = _sync_block(lines, "data", _dataset_lines(datasets), rewrite=False)
    return "\n".join(lines) + "\n"
