"""The teacher-output cache: teacher logits per (training sample, augmentation view).

On disk: `manifest.json` and shards `shard-NNNNN.npy`, each an array of shape
(samples in shard, views, classes) covering a contiguous range of sample indices. Shards are
memory-mapped when read. The manifest records counts, dtype, each shard's sha256, the teacher
checkpoint's sha256 and the augmentation that defines the views, so a consumer can check it is
reading the outputs of the teacher and views it expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bayeskd.io import atomic_path, sha256_file, write_json

FORMAT = "bayeskd.logit_cache/1"
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """The cache does not match what the consumer expects, or a shard is damaged."""


def write(logits: np.ndarray, directory: str | Path, *, dtype: str, shard_size: int,
          teacher_sha256: str, augmentation: dict) -> dict:
    """Write `logits` of shape (samples, views, classes) as shards plus a manifest; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, views, classes = logits.shape
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        name = f"shard-{i:05d}.npy"
        with atomic_path(directory / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, logits[start:stop].astype(dtype))
            digest = sha256_file(tmp)
        shards.append({"file": name, "start": start, "stop": stop, "sha256": digest})
    manifest = {
        "format": FORMAT, "num_samples": n, "num_views": views, "num_classes": classes,
        "dtype": dtype, "augmentation": augmentation, "teacher_sha256": teacher_sha256,
        "shards": shards,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


class LogitCache:
    """Read side: verifies the manifest and every shard's checksum on opening."""

    def __init__(self, directory: str | Path, *, num_samples: int, num_classes: int):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.exists():
            raise CacheError(f"{path}: no cache manifest; run the cache_logits stage first")
        self.manifest = m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise CacheError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
        for key, want in (("num_samples", num_samples), ("num_classes", num_classes)):
            if m[key] != want:
                raise CacheError(f"{path}: {key} is {m[key]}, but the training data has {want}")
        self.shards = []
        for s in m["shards"]:
            file = self.directory / s["file"]
            if not file.exists() or sha256_file(file) != s["sha256"]:
                raise CacheError(f"{file}: missing or corrupted (sha256 differs from the manifest)")
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
            if arr.shape != (s["stop"] - s["start"], m["num_views"], m["num_classes"]):
                raise CacheError(f"{file}: shape {arr.shape} disagrees with the manifest")
            self.shards.append(arr)
        self.shard_size = m["shards"][0]["stop"] - m["shards"][0]["start"]

    def logits(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits (float32) of samples `idx` at views `view` (view 0 when not given)."""
        idx_np = idx.numpy()
        view_np = np.zeros_like(idx_np) if view is None else view.numpy()
        out = np.empty((len(idx_np), self.manifest["num_classes"]), dtype=np.float32)
        shard_of = idx_np // self.shard_size
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self.shards[s][idx_np[rows] - s * self.shard_size, view_np[rows]]
        return torch.from_numpy(out)
