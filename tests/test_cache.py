import json

import numpy as np
import pytest
import torch

from bayeskd import cache


def build(tmp_path, n=10, views=3, classes=4, shard_size=4, dtype="float16"):
    logits = np.random.default_rng(0).normal(size=(n, views, classes)).astype(np.float32) * 5
    m = cache.write(logits, tmp_path, dtype=dtype, shard_size=shard_size, teacher_sha256="abc",
                    augmentation={"name": "identity", "views": views})
    return logits, m


def test_roundtrip_across_shards_and_views(tmp_path):
    logits, m = build(tmp_path)
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 4), (4, 8), (8, 10)]
    c = cache.LogitCache(tmp_path, num_samples=10, num_classes=4)
    idx, view = torch.tensor([9, 0, 5, 4, 3]), torch.tensor([2, 1, 0, 2, 1])
    got = c.logits(idx, view)
    assert got.dtype == torch.float32
    expected = logits[idx.numpy(), view.numpy()].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(c.logits(idx).numpy(),
                                  logits[idx.numpy(), 0].astype(np.float16).astype(np.float32))


def test_float32_is_exact(tmp_path):
    logits, _ = build(tmp_path, dtype="float32")
    c = cache.LogitCache(tmp_path, num_samples=10, num_classes=4)
    np.testing.assert_array_equal(c.logits(torch.arange(10), torch.full((10,), 2)).numpy(),
                                  logits[:, 2])


def test_corrupted_shard_is_named(tmp_path):
    build(tmp_path)
    shard = tmp_path / "shard-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(cache.CacheError, match="shard-00001.npy: missing or corrupted"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=4)


def test_truncated_shard_is_named(tmp_path):
    build(tmp_path)
    shard = tmp_path / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(cache.CacheError, match="shard-00002.npy"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=4)


def test_mismatch_with_training_data(tmp_path):
    build(tmp_path)
    with pytest.raises(cache.CacheError, match="num_samples is 10, but the training data has 11"):
        cache.LogitCache(tmp_path, num_samples=11, num_classes=4)
    with pytest.raises(cache.CacheError, match="no cache manifest"):
        cache.LogitCache(tmp_path / "nowhere", num_samples=10, num_classes=4)


def test_manifest_records_identity(tmp_path):
    build(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["teacher_sha256"] == "abc" and m["num_views"] == 3 and m["dtype"] == "float16"
    assert m["augmentation"] == {"name": "identity", "views": 3}
