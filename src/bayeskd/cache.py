"""The teacher-output cache: teacher logits for every (training sample, augmentation view).

On disk, in one directory:
- `views.npy`: int16 (samples, slots), the view id each slot of each sample holds: every view of the
  view space (`views: all`, slot = view id) or `n` views per sample drawn by seed.
- shards, each covering a contiguous range of samples: `shard-NNNNN.logits.npy` of shape
  (samples in shard, slots, classes); or, with top-k storage, `.topk_values.npy`,
  `.topk_indices.npy` (int16) and `.rest_logsumexp.npy` (float32, the log of the softmax mass of
  the other classes, so softmax at temperature 1 keeps the top-k probabilities and the rest's total).
  float16 and float32 are stored as such; bfloat16 as its raw 16 bits (numpy has no bfloat16).
- `manifest.json`: counts, dtype, top-k, the augmentation spec, the teacher checkpoint's sha256,
  and every file's sha256, sealed with the sha256 of its own content (`bayeskd.integrity.seal`).
  Written last: without it the cache is incomplete.
- `progress.json` while building: the shards done so far, so a killed build resumes from the last
  complete shard (if the teacher, views and format are the same).

Readers check every checksum before training starts, then hold the whole cache as one table on the
training device when it fits (CIFAR-100 at all 162 views in float16: 1.6 GB), so a step reads its
teacher logits with one gather on the device.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bayeskd import integrity, placement
from bayeskd.augment import CropFlip
from bayeskd.io import Failure, atomic_path, sha256_file, write_json
from bayeskd.placement import Teacher

FORMAT = "bayeskd.logit_cache/3"  # 3: the manifest is sealed
MANIFEST, PROGRESS, VIEWS = "manifest.json", "progress.json", "views.npy"
IDENTITY = {"name": "identity", "views": 1}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheError(Failure):
    """The cache does not match what the consumer expects, or a file is damaged."""


def _read_json(path: Path) -> object:
    """A JSON file's content, or CacheError naming the damaged file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: damaged ({type(e).__name__}: {e}); {integrity.remedy(path)}") from None


def _encode(t: Tensor, dtype: str) -> np.ndarray:
    t = t.to(TORCH_DTYPES[dtype])
    return (t.view(torch.int16) if dtype == "bfloat16" else t).cpu().numpy()


def _decode(t: Tensor, dtype: str) -> Tensor:
    """float32 values of stored logits (bfloat16 is stored as its raw 16 bits)."""
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def view_table(num_samples: int, augment: CropFlip | None, views: int | str, seed: int) -> np.ndarray:
    """The view id of each (sample, slot): all views, or `views` distinct ones per sample by seed."""
    total = 1 if augment is None else augment.num_views
    every = np.tile(np.arange(total, dtype=np.int16), (num_samples, 1))
    if views == "all" or views >= total:
        return every
    return np.sort(np.random.default_rng(seed).permuted(every, axis=1)[:, :views], axis=1)


def _save(directory: Path, name: str, array: np.ndarray) -> str:
    """Write `array` as `name` (.npy) atomically; its sha256."""
    buffer = io.BytesIO()  # serialised first: numpy reports a short write without its reason
    np.save(buffer, array)
    with atomic_path(directory / name) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


@torch.no_grad()
def teacher_logits(teacher: Teacher, x: Tensor, table: np.ndarray | Tensor, augment: CropFlip | None,
                   batch_size: int) -> Tensor:
    """float32 logits of shape (samples, slots, classes) for the views named by `table`, on the
    teacher's device: the inputs and the view table move there once, then each batch of views is
    made and run there without a wait for the device. A progress bar shows on a terminal only;
    logs get one line per shard from `build`."""
    from tqdm import tqdm

    x = x.to(teacher.device)
    view = torch.as_tensor(table).to(teacher.device, torch.int64).reshape(-1)
    n, slots = table.shape
    sample = torch.arange(n, device=teacher.device).repeat_interleave(slots)
    out = []
    starts = range(0, n * slots, batch_size)
    for a in tqdm(starts, desc="teacher views", unit="batch", leave=False, disable=None):
        s, v = sample[a : a + batch_size], view[a : a + batch_size]
        out.append(teacher(x[s] if augment is None else augment.apply(x[s], v)))
    return torch.cat(out).reshape(n, slots, -1)


def _shard_arrays(logits: Tensor, dtype: str, topk: int) -> dict[str, np.ndarray]:
    """The stored arrays of one shard's logits, made on their device, then copied to the host."""
    if not topk:
        return {"logits": _encode(logits, dtype)}
    values, indices = logits.topk(topk, dim=-1)
    rest = logits.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return {"topk_values": _encode(values, dtype), "topk_indices": indices.to(torch.int16).cpu().numpy(),
            "rest_logsumexp": rest.cpu().numpy()}


def build(model: nn.Module, x: Tensor, y: Tensor, directory: str | Path, *, num_classes: int,
          augment: CropFlip | None, views: int | str, seed: int, dtype: str, shard_size: int,
          topk: int, teacher_sha256: str, batch_size: int = 1024, device: torch.device | str = "auto",
          log: Callable[[str], None] = print) -> dict:
    """Build (or resume building) the cache of `model`'s logits on `x`, `batch_size` views per
    teacher forward on `device` (bayeskd.placement); return the manifest. The host waits for the
    device once per shard, to store it."""
    if topk >= num_classes:
        raise CacheError(f"cache.topk = {topk}: must be below the {num_classes} classes "
                         "(0 stores all logits)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    table = view_table(len(x), augment, views, seed)
    identity = {
        "format": FORMAT, "num_samples": len(x), "num_slots": table.shape[1], "num_classes": num_classes,
        "dtype": dtype, "topk": topk, "views": views, "seed": seed, "shard_size": shard_size,
        "augmentation": augment.spec() if augment else IDENTITY, "teacher_sha256": teacher_sha256,
    }
    progress_path = directory / PROGRESS
    try:
        progress = _read_json(progress_path) if progress_path.exists() else {}
    except CacheError:  # a damaged record of progress: build afresh
        progress = {}
    if not isinstance(progress, dict) or progress.get("identity") != identity:
        # a fresh build: nothing of another build may remain
        for f in directory.iterdir():
            if f.is_file():
                f.unlink()
        progress = {"identity": identity, "shards": []}
    teacher = Teacher(model, placement.choose(device))
    intact = lambda s: all((directory / f).exists() and sha256_file(directory / f) == h  # noqa: E731
                           for f, h in s["files"].items())
    done = {s["index"]: s for s in progress["shards"] if intact(s)}
    progress["shards"] = list(done.values())
    views_sha = _save(directory, VIEWS, table)

    n_shards = math.ceil(len(x) / shard_size)
    for i in range(n_shards):
        if i in done:
            log(f"cache shard {i + 1}/{n_shards}: already built")
            continue
        start, stop = i * shard_size, min((i + 1) * shard_size, len(x))
        t0 = time.perf_counter()
        logits = teacher_logits(teacher, x[start:stop], table[start:stop], augment, batch_size)
        files = {f"shard-{i:05d}.{name}.npy": arr for name, arr in _shard_arrays(logits, dtype, topk).items()}
        entry = {
            "index": i, "start": start, "stop": stop,
            "files": {name: _save(directory, name, arr) for name, arr in files.items()},
            "finite": bool(torch.isfinite(logits).all()),
            "accuracy": float((logits.argmax(-1) == y[start:stop, None].to(logits.device)).float().mean()),
        }
        progress["shards"].append(entry)
        write_json(progress_path, progress)
        seconds = time.perf_counter() - t0
        log(f"cache shard {i + 1}/{n_shards}: {logits.shape[0] * logits.shape[1]} views in {seconds:.1f}s "
            f"({logits.shape[0] * logits.shape[1] / seconds:.0f} views/s)")
    manifest = identity | {"view_table": {"file": VIEWS, "sha256": views_sha},
                           "shards": sorted(progress["shards"], key=lambda s: s["index"])}
    write_json(directory / MANIFEST, integrity.seal(manifest))
    progress_path.unlink()
    return manifest


class LogitCache:
    """Read side: checks the manifest against the consumer's expectations and every file's checksum
    on opening, then holds all shards as one table on `device` (bayeskd.placement) when they fit in
    half its free memory, else in host memory; serves teacher logits by (sample, slot)."""

    def __init__(self, directory: str | Path, *, num_samples: int, num_classes: int,
                 teacher_sha256: str | None = None, augmentation: dict | None = None,
                 device: torch.device | str = "auto"):
        self.directory = d = Path(directory)
        if not (d / MANIFEST).exists():
            raise CacheError(f"{d / MANIFEST}: no cache manifest; run the cache_logits stage first")
        m = _read_json(d / MANIFEST)
        damaged = lambda why: CacheError(f"{d / MANIFEST}: damaged ({why}); "  # noqa: E731
                                         f"{integrity.remedy(d / MANIFEST)}")
        sealed = isinstance(m, dict) and integrity.SEAL_KEY in m
        if sealed:  # damage before staleness: a damaged manifest is no cache of another build
            try:
                m = integrity.unseal(m)
            except ValueError as e:
                raise damaged(e) from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise CacheError(f"{d / MANIFEST}: format {found!r}, expected {FORMAT!r}; "
                             "rerun the cache_logits stage")
        if not sealed:
            raise damaged("no sha256 seal")
        self.manifest = m
        try:
            expected = {"num_samples": num_samples, "num_classes": num_classes,
                        "teacher_sha256": teacher_sha256, "augmentation": augmentation}
            for key, want in expected.items():
                if want is not None and m[key] != want:
                    raise CacheError(f"{d / MANIFEST}: the cache was built with {key} = {m[key]}, but "
                                     f"distill expects {want}; rerun the cache_logits stage")
            table = self._load(m["view_table"]["file"], m["view_table"]["sha256"])
            if table.size and (table.min() < 0 or table.max() >= m["augmentation"]["views"]):
                raise CacheError(f"{d / VIEWS}: view ids outside [0, {m['augmentation']['views']}); "
                                 "rerun the cache_logits stage")
            self.view_table = torch.from_numpy(table.astype(np.int64))
            shards = [{name.split(".")[1]: self._load(name, sha) for name, sha in s["files"].items()}
                      for s in m["shards"]]
            self.arrays = self._join(shards, placement.choose(device))
        except (KeyError, TypeError, IndexError) as e:
            raise CacheError(f"{d / MANIFEST}: damaged (no entry {e}); rerun the cache_logits stage") \
                from None

    def _load(self, name: str, sha: str) -> np.ndarray:
        path = self.directory / name
        if not path.exists() or sha256_file(path) != sha:
            raise CacheError(f"{path}: missing or corrupted (sha256 differs from the manifest); "
                             f"{integrity.remedy(path)}")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CacheError(f"{path}: unreadable: {e}") from None

    def _join(self, shards: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, Tensor]:
        """Each stored array of all shards as one tensor (samples first), on `device` if it fits."""
        m = self.manifest
        size = sum(a.nbytes for arrays in shards for a in arrays.values())
        home = device if placement.fits(size, device) else torch.device("cpu")
        joined: dict[str, Tensor] = {}
        for entry, arrays in zip(m["shards"], shards, strict=True):
            for name, array in arrays.items():
                part = torch.from_numpy(np.array(array))  # read into memory
                if name not in joined:
                    joined[name] = torch.empty((m["num_samples"], *part.shape[1:]), dtype=part.dtype,
                                               device=home)
                if len(part) != entry["stop"] - entry["start"]:
                    raise CacheError(f"{self.directory / MANIFEST}: damaged (shard {entry['index']} holds "
                                     f"{len(part)} samples, not {entry['stop'] - entry['start']})")
                joined[name][entry["start"] : entry["stop"]] = part
        return joined

    @property
    def home(self) -> torch.device:
        """Where the cache is held: the device, or host memory (bayeskd.placement.fits)."""
        return next(iter(self.arrays.values())).device

    def logits(self, idx: Tensor, slots: Tensor | None = None, host_idx: Tensor | None = None,
               host_slots: Tensor | None = None) -> Tensor:
        """float32 teacher logits of samples `idx` at `slots` (slot 0 when not given), on idx's
        device. With the cache on that device, one gather there, with no wait for the device. A
        cache held in host memory (too large for the device) is gathered there with the host copies
        of the indices (`host_idx`, `host_slots`: a Batch carries them), and its rows go to the
        device as stored, from pinned memory, without waiting; without host copies the call waits
        for its indices."""
        m, a, device = self.manifest, self.arrays, idx.device
        if self.home.type == "cpu" and device.type != "cpu":  # held in host memory, read for a device
            if host_idx is None or (host_slots is None) != (slots is None):
                host_idx, host_slots = idx.cpu(), None if slots is None else slots.cpu()
            idx, slots = host_idx, host_slots
        else:
            idx, slots = idx.to(self.home), None if slots is None else slots.to(self.home)
        at = (idx, torch.zeros_like(idx) if slots is None else slots)

        def read(name: str) -> Tensor:
            rows = a[name][at]
            if rows.device == device:
                return rows
            if rows.device.type != "cpu":  # a device's rows for the host: wait for them
                return rows.to(device)
            return (rows.pin_memory() if device.type == "cuda" else rows).to(device, non_blocking=True)

        if "logits" in a:
            return _decode(read("logits"), m["dtype"])
        # the rest's mass, spread evenly over the other classes
        rest = read("rest_logsumexp") - math.log(m["num_classes"] - m["topk"])
        out = rest[:, None].expand(-1, m["num_classes"]).clone()
        return out.scatter_(1, read("topk_indices").long(), _decode(read("topk_values"), m["dtype"]))
