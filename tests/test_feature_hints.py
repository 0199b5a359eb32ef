import math

import numpy as np
import pytest
import torch

from bayeskd import methods
from bayeskd.taps import Features
from conftest import feature_steps

N = 5
# stage shapes (C, H, W): the student is spatially larger in the first layout, smaller in the second;
# the teacher has one stage more, so the pairs are (s1, t2), (s2, t3)
LAYOUTS = {
    "student_larger": ([(3, 8, 8), (5, 4, 4)], [(2, 8, 8), (4, 4, 4), (6, 2, 2)]),
    "teacher_larger": ([(3, 2, 2), (5, 2, 2)], [(2, 8, 8), (4, 4, 4), (6, 4, 4)]),
}


def random_features(shapes: list[tuple[int, int, int]], seed: int, grad: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(N, *s, generator=g, dtype=torch.float64).requires_grad_(grad) for s in shapes]
    pooled = stages[-1].detach().mean((2, 3)).requires_grad_(grad)
    return Features(torch.randn(N, 10, generator=g, dtype=torch.float64), stages, pooled)


def pair(layout: str, grad: bool = False) -> tuple[Features, Features]:
    s_shapes, t_shapes = LAYOUTS[layout]
    return random_features(s_shapes, 1, grad), random_features(t_shapes, 2, grad)


def numpy_pairs(s: Features, t: Features) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stage pairs from the top, the larger map block-averaged down to the smaller one."""

    def pool(x: np.ndarray, h: int, w: int) -> np.ndarray:
        n, c, hx, wx = x.shape
        return x.reshape(n, c, h, hx // h, w, wx // w).mean((3, 5))

    pairs = []
    for k in range(1, min(len(s.stages), len(t.stages)) + 1):
        a, b = s.stages[-k].detach().numpy(), t.stages[-k].detach().numpy()
        h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
        pairs.insert(0, (pool(a, h, w), pool(b, h, w)))
    return pairs


def conv1x1(x: np.ndarray, conv: torch.nn.Conv2d) -> np.ndarray:
    out = np.einsum("oc,nchw->nohw", conv.weight.detach().numpy()[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias.detach().numpy()[None, :, None, None]


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fitnet_is_the_mse_of_the_connected_middle_pair(layout):
    s, t = pair(layout)
    method = methods.create("fitnet", s, t, 100).double()
    randomise(method, 3)
    got = method.terms(s, t, None, 1)["fitnet"].item()

    a, b = numpy_pairs(s, t)[1]  # two pairs: the middle one is index 1
    conv, bn = method.connector
    z = conv1x1(a, conv)
    mean, var = z.mean((0, 2, 3), keepdims=True), z.var((0, 2, 3), keepdims=True)
    gamma, beta = (p.detach().numpy()[None, :, None, None] for p in (bn.weight, bn.bias))
    z = (z - mean) / np.sqrt(var + bn.eps) * gamma + beta
    expected = 100.0 * np.mean((z - b) ** 2)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_is_the_squared_difference_of_normalised_attention_maps(layout, p):
    s, t = pair(layout)
    got = methods.create("at", s, t, 100, p=p).terms(s, t, None, 1)["at"].item()

    expected = 0.0
    for a, b in numpy_pairs(s, t):
        diffs = []
        for i in range(N):
            q_s = (np.abs(a[i]) ** p).sum(0).ravel()
            q_t = (np.abs(b[i]) ** p).sum(0).ravel()  # the sum, not the mean: the scale cancels
            diffs.extend(q_s / math.sqrt((q_s**2).sum()) - q_t / math.sqrt((q_t**2).sum()))
        expected += np.mean(np.square(diffs))
    assert got == pytest.approx(1000.0 * expected, rel=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vid_is_the_gaussian_negative_log_likelihood(layout):
    s, t = pair(layout)
    method = methods.create("vid", s, t, 100).double()
    var0 = torch.nn.functional.softplus(method.alphas[0]) + 1e-5
    torch.testing.assert_close(var0, torch.full_like(var0, 5.0))
    randomise(method, 4)
    got = method.terms(s, t, None, 1)["vid"].item()

    expected = 0.0
    for (a, b), regressor, alpha in zip(numpy_pairs(s, t), method.regressors, method.alphas, strict=True):
        c1, _, c2, _, c3 = regressor
        mu = conv1x1(np.maximum(conv1x1(np.maximum(conv1x1(a, c1), 0), c2), 0), c3)
        var = np.log1p(np.exp(alpha.detach().numpy())) + 1e-5
        nll = 0.0
        for c in range(b.shape[1]):  # -log N(b | mu, var) + log(2 pi) / 2, per element
            nll += np.sum(0.5 * np.log(var[c]) + (b[:, c] - mu[:, c]) ** 2 / (2 * var[c]))
        expected += nll / b.size
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["fitnet", "at", "vid"])
def test_training_lowers_the_term(name):
    history = feature_steps(name)
    assert all(math.isfinite(v) for step in history for v in step.values())
    assert set(history[0]) == {"ce", name}
    assert np.mean([h[name] for h in history[-5:]]) < history[0][name]


@pytest.mark.parametrize("name", ["fitnet", "at", "vid"])
def test_gradients_reach_the_student_and_the_method_not_the_teacher(name):
    s, t = pair("student_larger", grad=True)
    method = methods.create(name, s, t, 100).double()
    method.terms(s, t, None, 1)[name].backward()
    assert all(f.grad is None for f in [*t.stages, t.pooled])
    used = s.stages[1:] if name == "fitnet" else s.stages  # FitNet reads the middle pair only
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in used)
    for p in method.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_vid_builds_one_regressor_per_stage_pair():
    s, t = pair("teacher_larger")
    method = methods.create("vid", s, t, 100)
    assert len(method.regressors) == len(method.alphas) == 2
    assert [a.shape[0] for a in method.alphas] == [4, 6]


def test_at_on_a_zoo_pair():
    history = feature_steps(
        "at", student_net="resnet8", teacher_net="resnet14", in_shape=(3, 32, 32), steps=3, n=16
    )
    assert all(math.isfinite(v) for step in history for v in step.values())
