"""File output that never leaves a half-written file, and hashing.

Every output is written to a temporary file beside its target and renamed into place only when
complete, with the permissions a plain write would give (0666 minus the umask). `outputs()` does
that for a group of files: none is renamed until all are written, and they are renamed in the order
given (metrics last), so a failure (a full disk, a read-only directory) leaves all the old files.
Any such failure is an `OutputError` naming the file and the reason.

`Failure` is the base of every error a user can act on (a damaged or missing input, a full disk, a
diverged loss): its message is one line naming the file or key, and stages end with it, not with a
traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class Failure(RuntimeError):
    """An error a user can act on; the message names the file or key, the value and what to do."""


class OutputError(Failure):
    """An output could not be written; the old file, if any, is untouched."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = Path(path), reason


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Outputs:
    """Files written together: `path(target)` hands out a temporary file beside `target` to write;
    `commit()` renames them all into place in the order they were asked for."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, target: str | Path) -> Path:
        target = Path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as e:
            raise OutputError(target, e.strerror or str(e)) from None
        self._pending.append((Path(tmp), target))
        return Path(tmp)

    def text(self, target: str | Path, text: str) -> None:
        tmp = self.path(target)
        try:
            tmp.write_text(text)
        except OSError as e:
            raise OutputError(target, e.strerror or str(e)) from None

    def commit(self) -> None:
        for tmp, target in self._pending:
            try:
                os.replace(tmp, target)
            except OSError as e:
                raise OutputError(target, e.strerror or str(e)) from None
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending.clear()


@contextlib.contextmanager
def outputs() -> Iterator[Outputs]:
    """A group of outputs, renamed into place together when the block succeeds, else discarded. An
    OSError inside the block (writing a temporary file) becomes an OutputError naming the target."""
    out = Outputs()
    try:
        yield out
        out.commit()
    except OutputError:
        raise
    except OSError as e:  # in writing a temporary file: the one named, else the latest handed out
        named = [t for tmp, t in out._pending if e.filename and Path(e.filename) == tmp]
        target = (named or [t for _, t in out._pending[-1:]] or [e.filename or "an output"])[0]
        raise OutputError(target, e.strerror or str(e)) from None
    finally:
        out.discard()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    with outputs() as out:
        yield out.path(path)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json_text(obj))


def write_text(path: str | Path, text: str) -> None:
    with outputs() as out:
        out.text(path, text)


def json_text(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def csv_text(rows: list[dict]) -> str:
    """Rows of equal keys as CSV with a header."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict]) -> None:
    write_text(path, csv_text(rows))


def run(args: list[str], cwd: str | Path) -> str:
    """Run a command; its stdout, or RuntimeError with the end of its output."""
    import subprocess

    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(args[-4:])}` failed in {cwd}:\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout.strip()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
