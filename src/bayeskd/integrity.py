"""Integrity of the files the pipeline writes: the digests they carry, `bayeskd verify`, and the
command that restores a damaged file.

Every model and cache file carries a digest of its content, and every reader checks it:
- safetensors weights: the sha256 of their tensors (names, dtypes, shapes, bytes) in the file's
  metadata, under `bayeskd.sha256`;
- ONNX models: the sha256 of the model in its metadata_props, under `bayeskd.sha256`;
- JSON records (the cache manifest, a prepared dataset's info.json) are sealed: a top-level
  `sha256` of the rest of the record. A sealed record vouches for the files it names as
  `{"file": NAME, "sha256": HEX}` or `"files": {NAME: HEX, ...}` (the cache's arrays);
- `.npz` arrays (a prepared dataset's splits) are zip files with a CRC-32 per array.

DVC cannot see all damage. It trusts its cache: a damaged cache object is restored as it is by
`dvc checkout`, and a stage rerun that makes the same bytes is linked back to the damaged copy. So
`verify` compares every output in the workspace with `dvc.lock` and with its own digest, and checks
the DVC cache's copy of each output too, and `remedy` names the command that really restores a file:
`dvc checkout --force` from an intact cache copy, `git checkout` for an output kept in git, or, for
a damaged cache copy, deleting it and `dvc repro` (rerunning the stage records a fresh copy).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

DIGEST_KEY = "bayeskd.sha256"  # in safetensors metadata and ONNX metadata_props
SEAL_KEY = "sha256"  # of a sealed JSON record


# --- the digests files carry ---------------------------------------------------------------------

def weights_digests(raw: bytes) -> tuple[str, str | None]:
    """(the sha256 of a safetensors file's tensors, the one its metadata records or None).
    ValueError if `raw` is not a safetensors file."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(raw[:8], "little")
    if size > len(raw) - 8:
        raise ValueError("truncated header")
    header = json.loads(raw[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(raw[8 + size :])
    return h.hexdigest(), metadata.get(DIGEST_KEY)


def _record_digest(record: dict) -> str:
    rest = {k: v for k, v in record.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def seal(record: dict) -> dict:
    """`record` with the sha256 of its content (written as JSON; `unseal` checks it)."""
    return {k: v for k, v in record.items() if k != SEAL_KEY} | {SEAL_KEY: _record_digest(record)}


def unseal(record: object) -> dict:
    """A sealed record without its seal; ValueError if it is not one, or its content changed."""
    if not isinstance(record, dict) or SEAL_KEY not in record:
        raise ValueError("no sha256 seal")
    if record[SEAL_KEY] != _record_digest(record):
        raise ValueError("its content does not match its sha256")
    return {k: v for k, v in record.items() if k != SEAL_KEY}


def vouched_files(record: object) -> dict[str, str]:
    """The files a sealed record names with their sha256: {"file": NAME, "sha256": HEX} and
    "files": {NAME: HEX} entries at any depth."""
    found: dict[str, str] = {}
    if isinstance(record, dict):
        if isinstance(record.get("file"), str) and isinstance(record.get("sha256"), str):
            found[record["file"]] = record["sha256"]
        if isinstance(record.get("files"), dict):
            found |= {k: v for k, v in record["files"].items() if isinstance(v, str)}
        for value in record.values():
            found |= vouched_files(value)
    elif isinstance(record, list):
        for value in record:
            found |= vouched_files(value)
    return found


def _onnx_tail(digest: str) -> bytes:
    """The serialised metadata_props entry that `onnx_with_digest` appends (protobuf merges it)."""
    import onnx

    return onnx.ModelProto(metadata_props=[onnx.StringStringEntryProto(key=DIGEST_KEY, value=digest)]
                           ).SerializeToString()


def onnx_with_digest(model: bytes) -> bytes:
    """A serialised ONNX model with the sha256 of its bytes appended as a metadata_props entry."""
    return model + _onnx_tail(hashlib.sha256(model).hexdigest())


def onnx_problem(raw: bytes) -> str | None:
    """Why an ONNX file written by `onnx_with_digest` is damaged, or None if it is intact."""
    import onnx

    try:
        model = onnx.ModelProto.FromString(raw)
        recorded = [p.value for p in model.metadata_props if p.key == DIGEST_KEY]
        tail = _onnx_tail(recorded[-1]) if recorded else b""
    except Exception:  # protobuf's DecodeError, or ValueError for a string no longer UTF-8
        return "not a readable ONNX model"
    if not recorded:
        return f"no {DIGEST_KEY} in its metadata"
    if not raw.endswith(tail) or hashlib.sha256(raw[: -len(tail)]).hexdigest() != recorded[-1]:
        return f"its content does not match the {DIGEST_KEY} in its metadata"
    return None


def own_problem(path: Path) -> str | None:
    """Why a file fails its own digest, or None: it passes, or it carries none (reports, curves)."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        try:
            actual, recorded = weights_digests(raw)
        except ValueError as e:
            return f"not a safetensors file ({e})"
        if recorded is None:
            return f"no {DIGEST_KEY} in its metadata"
        return None if actual == recorded else f"its tensors do not match the {DIGEST_KEY} in its metadata"
    if path.suffix == ".onnx":
        return onnx_problem(raw)
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"not a readable .npz ({e})"
        return None if bad is None else f"{bad} fails its CRC-32"
    if path.suffix == ".json":
        try:
            record = json.loads(raw.decode("utf-8"))
        except ValueError:
            return None  # not sealed: dvc.lock's md5 is its only digest
        if isinstance(record, dict) and SEAL_KEY in record:
            try:
                unseal(record)
            except ValueError as e:
                return str(e)
    return None


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the outputs dvc.lock records ----------------------------------------------------------------

@dataclass
class Output:
    """One output of dvc.lock: its path, stage, md5 (`<hash>.dir` for a directory), and whether it
    is in the DVC cache (else in git)."""

    path: str
    stage: str
    md5: str
    cached: bool

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


def _cached_flags(root: Path) -> dict[str, bool]:
    """Each output path of dvc.yaml: True unless it says `cache: false`."""
    flags = {}
    for stage in (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                path, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                flags[path] = (opts or {}).get("cache", True)
    return flags


def lock_outputs(root: str | Path = ".") -> list[Output]:
    """Every output dvc.lock records (OSError, yaml.YAMLError if dvc.lock cannot be read)."""
    root = Path(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    cached = _cached_flags(root)
    return [Output(o["path"], name, o["md5"], cached.get(o["path"], True))
            for name, stage in ((lock or {}).get("stages") or {}).items() for o in stage.get("outs", [])
            if "md5" in o]


class _DvcCache:
    """Paths of objects in the project's DVC cache (where `dvc cache dir` points)."""

    def __init__(self, root: Path):
        from dvc.repo import Repo

        try:
            with Repo(str(root)) as repo:
                self.objects = Path(repo.cache.local.path)
        except Exception as e:  # not a DVC project, a damaged .dvc/config: DVC raises its own kinds
            raise ValueError(f"{root}: not a DVC project DVC can open ({e})") from None
        self._states: dict[str, str] = {}

    def path(self, md5: str) -> Path:
        """The object's path: relative to the working directory when the cache is inside it."""
        obj = self.objects / md5[:2] / md5[2:]
        return obj.relative_to(Path.cwd()) if obj.is_relative_to(Path.cwd()) else obj

    def state(self, md5: str) -> str:
        """'intact', 'damaged' or 'absent': the cached copy of the content with this md5."""
        if md5 not in self._states:
            obj = self.path(md5)
            self._states[md5] = ("absent" if not obj.is_file() else
                                 "intact" if md5_file(obj) == md5.removesuffix(".dir") else "damaged")
        return self._states[md5]


def _dir_listing(entries: list[dict]) -> str:
    """DVC's md5 of a directory: of the JSON list of its files' md5s, sorted by relative path."""
    entries = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _git(root: Path, *args: str) -> bytes | None:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True)
    return r.stdout if r.returncode == 0 else None


def _git_md5(root: Path, path: str) -> str | None:
    """md5 of the file as committed at HEAD, or None."""
    blob = _git(root, "show", f"HEAD:{path}")
    return None if blob is None else hashlib.md5(blob).hexdigest()


def _ignored(root: Path) -> list[str]:
    """.dvcignore's patterns (names only: this project ignores interpreter caches)."""
    f = root / ".dvcignore"
    lines = f.read_text().splitlines() if f.exists() else []
    return [s.rstrip("/") for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _present(root: Path, out: Output, ignored: list[str]) -> list[str]:
    """The output's files in the workspace, relative to the project."""
    base = root / out.path
    if not out.is_dir:
        return [out.path] if base.is_file() else []
    return sorted(f.relative_to(root).as_posix() for f in base.rglob("*") if f.is_file() and not any(
        fnmatch.fnmatch(part, p) for part in f.relative_to(base).parts for p in ignored))


def _expected(root: Path, out: Output, cache: _DvcCache | None) -> dict[str, str] | None:
    """The md5 of each file dvc.lock records for the output, or None where no listing of a
    directory is at hand (not in the DVC cache, and not as committed at HEAD)."""
    if not out.is_dir:
        return {out.path: out.md5}
    if cache is not None and cache.state(out.md5) == "intact":
        entries = json.loads(cache.path(out.md5).read_text())
        return {f"{out.path}/{e['relpath']}": e["md5"] for e in entries}
    listed = _git(root, "ls-files", "--", out.path)
    if listed:
        files = listed.decode().split()
        md5s = {f: _git_md5(root, f) for f in files}
        entries = [{"md5": m, "relpath": f[len(out.path) + 1 :]} for f, m in md5s.items() if m]
        if _dir_listing(entries) == out.md5:
            return md5s
    return None


# --- what is wrong, and what restores it ---------------------------------------------------------

def _remedy(root: Path, out: Output, path: str, actual: str | None, expected: str | None,
            cache: _DvcCache | None) -> str:
    """The command that restores `path` to what dvc.lock records. `actual`: its md5 in the
    workspace (None: missing); `expected`: the md5 dvc.lock records for it (None: unknown)."""
    rebuild = f"rebuild it with `dvc repro -f -s {out.stage}`, then `dvc repro`"
    if expected is not None and actual == expected:  # dvc.lock records the damaged content
        return f"dvc.lock records it as it is: {rebuild}"
    if not out.cached:
        if expected is not None and _git_md5(root, path) == expected:
            return f"restore it with `git checkout -- {path}`"
        return rebuild
    state = cache.state(expected) if cache is not None and expected is not None else "absent"
    if state == "intact":
        return f"restore it with `dvc checkout --force {out.path}`"
    if state == "damaged":
        obj = cache.path(expected)
        return (f"the DVC cache's copy {obj} is damaged too: delete it and rebuild, "
                f"`rm -f {obj} && dvc repro`")
    return f"it is not in the DVC cache: fetch it with `dvc pull {out.path}` or rebuild it with `dvc repro`"


def _output_of(outputs: list[Output], path: str) -> Output | None:
    for out in outputs:
        if path == out.path or path.startswith(out.path.rstrip("/") + "/"):
            return out
    return None


def remedy(path: str | Path, root: str | Path = ".") -> str:
    """The command that restores a damaged or missing input, from dvc.lock and the DVC cache: what
    a stage's error names. Outside a DVC project: rebuild it with `dvc repro`."""
    root = Path(root).resolve()
    try:
        rel = Path(path).resolve().relative_to(root).as_posix()
        outputs = lock_outputs(root)
        out = _output_of(outputs, rel)
        if out is None:
            raise ValueError(rel)
        cache = _DvcCache(root) if out.cached else None
        expected = (_expected(root, out, cache) or {}).get(rel)
        actual = md5_file(root / rel) if (root / rel).is_file() else None
        return _remedy(root, out, rel, actual, expected, cache)
    except Exception:  # no dvc.lock, not an output, no DVC: the general advice
        return "rebuild it with `dvc repro`"


def verify(root: str | Path = ".", against_lock: bool = True) -> tuple[list[str], int]:
    """Check every output dvc.lock records: the workspace's files against their own digests and, with
    `against_lock`, against dvc.lock (missing, changed or extra files), and the DVC cache's copy of
    each. Returns one line per problem ("PATH: what is wrong; the command that restores it") and the
    number of files checked. Without `against_lock` (a workspace that is about to run, whose files
    may differ from dvc.lock by right) only damage counts."""
    root = Path(root).resolve()
    try:
        outputs = lock_outputs(root)
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {root / 'dvc.lock'} ({type(e).__name__}: {' '.join(str(e).split())}); "
                         "`git checkout -- dvc.lock` restores the committed one") from None
    cache = _DvcCache(root) if any(o.cached for o in outputs) else None
    ignored = _ignored(root)
    problems, checked = [], 0
    for out in outputs:
        actual = {f: md5_file(root / f) for f in _present(root, out, ignored)}
        checked += len(actual)
        problems += _check_output(root, out, actual, cache if out.cached else None, against_lock)
    return problems, checked


def _check_output(root: Path, out: Output, actual: dict[str, str], cache: _DvcCache | None,
                  against_lock: bool) -> list[str]:
    """The problems of one output whose files in the workspace have the md5s `actual`."""
    problems = []
    whole = _dir_listing([{"md5": m, "relpath": f[len(out.path) + 1 :]} for f, m in actual.items()]
                         ) if out.is_dir else None
    if out.is_dir and cache is not None and cache.state(out.md5) == "damaged":
        problems.append(_damaged_copy(out.path, "list of files", cache.path(out.md5), out, whole == out.md5))
    expected = _expected(root, out, cache)
    if expected is None:  # a directory whose list of files is not at hand: it is checked as a whole
        if against_lock and actual and whole != out.md5:
            problems.append(f"{out.path}: differs from dvc.lock; "
                            + _remedy(root, out, out.path, None, None, cache))
        expected = dict(actual)
    for f in sorted(set(expected) | set(actual)):
        problem = _check_file(root, out, f, expected.get(f), actual.get(f), cache, against_lock)
        if problem:
            problems.append(problem)
    return problems


def _damaged_copy(path: str, what: str, obj: Path, out: Output, workspace_intact: bool) -> str:
    fix = f"dvc commit -f {out.path}" if workspace_intact else "dvc repro"
    return (f"{path}: the DVC cache's {what} {obj} is damaged (`dvc checkout` would restore it so); "
            f"delete it and record an intact one, `rm -f {obj} && {fix}`")


def _check_file(root: Path, out: Output, f: str, want: str | None, have: str | None, cache: _DvcCache | None,
                against_lock: bool) -> str | None:
    """The problem of one file of an output: `want` is the md5 dvc.lock records, `have` the
    workspace's (None: not recorded, missing)."""
    why = own_problem(root / f) if have is not None else None
    if why:
        return f"{f}: damaged ({why}); " + _remedy(root, out, f, have, want, cache)
    if cache is not None and want is not None and cache.state(want) == "damaged":
        return _damaged_copy(f, "copy", cache.path(want), out, have == want)
    if not against_lock or have == want:
        return None
    if have is None:
        return f"{f}: missing; " + _remedy(root, out, f, None, want, cache)
    if want is None:
        return f"{f}: not in dvc.lock's {out.path}; remove it, `rm {f}`"
    return f"{f}: differs from dvc.lock; " + _remedy(root, out, f, have, want, cache)
