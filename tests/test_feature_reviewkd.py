import math

import pytest
import torch

from bayeskd import methods
from bayeskd.batch import Batch
from bayeskd.methods.reviewkd import hcl
from conftest import feature_steps


def pooled_to(f: torch.Tensor, level: int) -> torch.Tensor:
    """Average pooling of an N x C x H x W map to level x level, H and W divisible by level."""
    n, c, h, w = f.shape
    return f.reshape(n, c, level, h // level, level, w // level).mean((3, 5))


def direct_hcl(fs, ft):
    mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
    levels = [lv for lv in (4, 2, 1) if lv < fs.shape[-2]]
    weights = [0.5 ** (i + 1) for i in range(len(levels))]
    total = mse(fs, ft) + sum(
        w * mse(pooled_to(fs, lv), pooled_to(ft, lv)) for w, lv in zip(weights, levels, strict=True)
    )
    return total / (1 + sum(weights))


@pytest.mark.parametrize("size", [8, 4, 2, 1])
def test_hcl_matches_direct_evaluation(size):
    torch.manual_seed(size)
    fs, ft = torch.randn(3, 5, size, size), torch.randn(3, 5, size, size)
    assert math.isclose(hcl(fs, ft).item(), direct_hcl(fs, ft), rel_tol=1e-5)


def test_hcl_at_8x8_by_hand():
    fs, ft = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    fs[..., :2, :2] = 5.0
    # MSE at 8x8: (4 * 25 + 60) / 64 = 2.5; at 4x4: (25 + 15) / 16 = 2.5; at 2x2: the top-left
    # quadrant averages 2, so (4 + 3) / 4 = 1.75; at 1x1: the mean is 1.25, so 1.5625
    want = (2.5 + 0.5 * 2.5 + 0.25 * 1.75 + 0.125 * 1.5625) / 1.875
    assert math.isclose(hcl(fs, ft).item(), want, rel_tol=1e-6)


def features(stages, pooled):
    return methods.Features(torch.zeros(2, 10), [torch.zeros(2, *s) for s in stages], torch.zeros(2, pooled))


def test_fusion_matches_the_teacher_levels_deep_to_shallow():
    s = features([(4, 16, 16), (8, 8, 8), (12, 4, 4)], 12)
    t = features([(6, 32, 32), (10, 16, 16)], 20)  # fewer, larger teacher stages: matched from the top
    method = methods.create("reviewkd", s, t, 10)
    assert len(method.abfs) == 3 and method.abfs[0].attention is None
    assert all(abf.attention is not None for abf in method.abfs[1:])
    assert method.abfs[0].reduce[0].out_channels == 12  # min(512, student pooled width)
    student = [torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4), torch.randn(2, 12, 1, 1)]
    fused = method.review(student, [(32, 32), (16, 16), (1, 1)])
    assert [tuple(f.shape) for f in fused] == [(2, 6, 32, 32), (2, 10, 16, 16), (2, 20, 1, 1)]


def test_warm_up_scales_the_term():
    torch.manual_seed(0)
    s, t = features([(8, 4, 4), (16, 4, 4)], 16), features([(32, 4, 4), (64, 4, 4)], 64)
    for f in (s, t):
        f.stages, f.pooled = [torch.randn_like(m) for m in f.stages], torch.randn_like(f.pooled)
    method = methods.create("reviewkd", s, t, 10).eval()
    batch = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2))
    full = method.terms(s, t, batch, epoch=19)["reviewkd"]  # epochs count from 0: the 20th
    for epoch in (0, 4, 18, 19, 39):
        got = method.terms(s, t, batch, epoch=epoch)["reviewkd"]
        torch.testing.assert_close(got, min((epoch + 1) / 20, 1.0) * full)
    half = methods.create("reviewkd", s, t, 10, weight=2.0, warmup=4).eval()
    half.load_state_dict(method.state_dict())
    torch.testing.assert_close(half.terms(s, t, batch, epoch=1)["reviewkd"], full)


def test_reviewkd_trains():
    history = feature_steps("reviewkd", warmup=1)  # full weight from the first epoch
    loss = [h["reviewkd"] for h in history]
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert sum(loss[-5:]) / 5 < 0.95 * loss[0]


def test_zoo_pair():
    history = feature_steps(
        "reviewkd", student_net="resnet8", teacher_net="resnet14", in_shape=(3, 32, 32), steps=2, n=16
    )
    assert all(math.isfinite(v) for h in history for v in h.values())
