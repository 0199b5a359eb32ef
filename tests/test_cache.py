import hashlib
import json

import numpy as np
import pytest
import torch

from bayeskd import cache, distill, integrity, nets
from bayeskd.augment import CropFlip
from bayeskd.config import Optim
from bayeskd.train import Checkpoint, TrainSet, fit, seed_everything

AUG = CropFlip(1)  # 18 views of an 8x8 image


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = nets.build("cnn_teacher", 10, (1, 8, 8)).eval()
    for m in teacher.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(10, 1, 8, 8)
    y = torch.arange(10)
    return teacher, x, y


def build(tmp_path, setup, **kw):
    teacher, x, y = setup
    args = dict(num_classes=10, augment=AUG, views="all", seed=0, dtype="float32", shard_size=4,
                topk=0, teacher_sha256="t" * 64, batch_size=7, log=lambda _: None) | kw
    return cache.build(teacher, x, y, tmp_path, **args)


def test_every_view_equals_the_online_teacher(tmp_path, setup):
    teacher, x, _ = setup
    m = build(tmp_path / "f32", setup)
    assert (m["num_slots"], len(m["shards"])) == (18, 3)
    f32 = cache.LogitCache(tmp_path / "f32", num_samples=10, num_classes=10)
    build(tmp_path / "f16", setup, dtype="float16")
    f16 = cache.LogitCache(tmp_path / "f16", num_samples=10, num_classes=10)
    idx = torch.arange(10).repeat_interleave(18)
    views = torch.arange(18).repeat(10)
    with torch.no_grad():
        online = teacher(AUG.apply(x[idx], views))  # one forward per (sample, view)
    torch.testing.assert_close(f32.logits(idx, views), online, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f16.logits(idx, views), online, rtol=1e-3, atol=1e-3)  # fp16 rounding
    assert torch.equal(f32.view_table, torch.arange(18).expand(10, 18))


def student_losses(tmp_path, x, y, teacher, cached: cache.LogitCache | None, seed=3):
    """Per-step KD losses of a student, its teacher logits from the cache or from the teacher online
    (the teacher then sees the same augmented batch)."""
    seen = []
    seed_everything(seed)
    student = nets.build("cnn_student", 10, (1, 8, 8))
    kd = distill.distiller("kd", student, cache=cached, teacher=None if cached else teacher)

    def loss_fn(logits, batch, epoch):
        terms = kd.loss_fn(logits, batch, epoch)
        seen.append(sum(terms.values()).item())
        return terms

    cfg = Optim(epochs=3, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.0, milestones=[2], gamma=0.1)
    fit(student, loss_fn, TrainSet(x, y, AUG, kd.view_table), cfg, seed=seed,
        checkpoint=Checkpoint(tmp_path / f"{cached is None}.pt", "kd"))
    return seen, student


def test_cached_student_sees_exactly_the_online_supervision(tmp_path, setup):
    teacher, x, y = setup
    build(tmp_path, setup)
    cached = cache.LogitCache(tmp_path, num_samples=10, num_classes=10)
    online, s_online = student_losses(tmp_path, x, y, teacher, None)
    offline, s_cached = student_losses(tmp_path, x, y, teacher, cached)
    assert len(online) == len(offline) == 9  # 3 epochs x 3 batches
    np.testing.assert_allclose(offline, online, rtol=1e-4)
    for a, b in zip(s_online.state_dict().values(), s_cached.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4)


def test_killed_build_resumes_from_the_last_complete_shard(tmp_path, setup):
    reference = build(tmp_path / "ref", setup)
    teacher, x, y = setup
    forwards = []

    class Counting(torch.nn.Module):
        def __init__(self, fail_after=None):
            super().__init__()
            self.fail_after = fail_after

        def forward(self, inp):
            forwards.append(len(inp))
            if self.fail_after is not None and sum(forwards) > self.fail_after:
                raise KeyboardInterrupt  # killed in the middle of the second shard
            return teacher(inp)

    args = dict(num_classes=10, augment=AUG, views="all", seed=0, dtype="float32", shard_size=4, topk=0,
                teacher_sha256="t" * 64, batch_size=7, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        cache.build(Counting(fail_after=4 * 18 + 10), x, y, tmp_path / "run", **args)
    assert not (tmp_path / "run" / cache.MANIFEST).exists()  # incomplete: no manifest
    forwards.clear()
    resumed = cache.build(Counting(), x, y, tmp_path / "run", **args)
    assert sum(forwards) == 6 * 18  # the first shard (4 samples) was not computed again
    assert resumed == reference  # same files, same checksums


def test_manifest_mismatch_is_named(tmp_path, setup):
    build(tmp_path, setup)
    with pytest.raises(cache.CacheError, match="teacher_sha256 = t+, but distill expects u+"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=10, teacher_sha256="u" * 64)
    with pytest.raises(cache.CacheError, match="augmentation = .*'padding': 1.*expects .*'padding': 4"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=10, augmentation=CropFlip(4).spec())
    with pytest.raises(cache.CacheError, match="num_samples = 10, but distill expects 11"):
        cache.LogitCache(tmp_path, num_samples=11, num_classes=10)
    with pytest.raises(cache.CacheError, match="no cache manifest"):
        cache.LogitCache(tmp_path / "nowhere", num_samples=10, num_classes=10)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_named_before_training(tmp_path, setup, damage):
    build(tmp_path, setup)
    shard = tmp_path / "shard-00001.logits.npy"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]) if damage == "flip" else raw[:-8])
    with pytest.raises(cache.CacheError, match="shard-00001.logits.npy: missing or corrupted"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=10)


def test_a_fresh_build_leaves_no_file_of_an_earlier_one(tmp_path, setup):
    build(tmp_path, setup, topk=3)
    m = build(tmp_path, setup)  # another format into the same directory
    expected = {cache.MANIFEST, cache.VIEWS} | {f for s in m["shards"] for f in s["files"]}
    assert {f.name for f in tmp_path.iterdir()} == expected


def test_topk_round_trip(tmp_path, setup):
    build(tmp_path / "full", setup)
    m = build(tmp_path / "top3", setup, topk=3)
    assert set(m["shards"][0]["files"]) == {f"shard-00000.{n}.npy" for n in
                                            ("topk_values", "topk_indices", "rest_logsumexp")}
    full = cache.LogitCache(tmp_path / "full", num_samples=10, num_classes=10)
    top = cache.LogitCache(tmp_path / "top3", num_samples=10, num_classes=10)
    idx, slots = torch.arange(10).repeat(2), torch.arange(20) % 18
    a, b = full.logits(idx, slots), top.logits(idx, slots)
    p, q = a.softmax(1), b.softmax(1)
    k_idx = a.topk(3, 1).indices
    assert torch.equal(b.topk(3, 1).indices, k_idx)
    torch.testing.assert_close(q.gather(1, k_idx), p.gather(1, k_idx), rtol=1e-5, atol=1e-6)
    rest = torch.ones_like(p).scatter(1, k_idx, 0.0).bool()
    torch.testing.assert_close((q * rest).sum(1), (p * rest).sum(1), rtol=1e-4, atol=1e-6)
    assert sum((tmp_path / "top3" / f).stat().st_size for f in m["shards"][0]["files"]) < (
        (tmp_path / "full" / "shard-00000.logits.npy").stat().st_size)


def test_views_per_sample_and_bfloat16(tmp_path, setup):
    teacher, x, _ = setup
    m = build(tmp_path, setup, views=5, dtype="bfloat16", seed=7)
    c = cache.LogitCache(tmp_path, num_samples=10, num_classes=10)
    table = c.view_table
    assert table.shape == (10, 5) and m["num_slots"] == 5
    assert all(len(set(row.tolist())) == 5 for row in table) and (table < 18).all()
    assert not all(torch.equal(table[0], row) for row in table)  # drawn per sample
    np.testing.assert_array_equal(table.numpy(), cache.view_table(10, AUG, 5, 7))  # by seed
    idx, slots = torch.arange(10), torch.full((10,), 4)
    with torch.no_grad():
        online = teacher(AUG.apply(x, table[idx, slots]))
    torch.testing.assert_close(c.logits(idx, slots), online, rtol=1e-2, atol=2e-2)  # bf16 rounding
    assert json.loads((tmp_path / cache.MANIFEST).read_text())["dtype"] == "bfloat16"


def test_view_ids_outside_the_view_space_are_named_on_opening(tmp_path, setup):
    """A view table whose checksum matches but whose ids do not (a cache written by other code): the
    ids are checked once, on opening, since a step applies them without reading them back."""
    build(tmp_path, setup)
    table = np.load(tmp_path / cache.VIEWS)
    table[3, 5] = AUG.num_views
    cache._save(tmp_path, cache.VIEWS, table)
    manifest = json.loads((tmp_path / cache.MANIFEST).read_text())
    manifest["view_table"]["sha256"] = hashlib.sha256((tmp_path / cache.VIEWS).read_bytes()).hexdigest()
    (tmp_path / cache.MANIFEST).write_text(json.dumps(integrity.seal(manifest)))
    with pytest.raises(cache.CacheError, match=r"views.npy: view ids outside \[0, 18\)"):
        cache.LogitCache(tmp_path, num_samples=10, num_classes=10)
