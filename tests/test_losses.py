import math

import numpy as np
import pytest
import torch

from bayeskd import calibration, nets
from bayeskd.datasets.gaussian import gaussian_bcpd
from bayeskd.losses import TEACHER_LOSSES, ce, ls, mse


def test_mse_hand_computed():
    # softmax([0, ln 3]) = [0.25, 0.75]; label 1: (0.25)^2 + (0.25)^2 = 0.125
    # softmax([0, 0]) = [0.5, 0.5];      label 0: 0.25 + 0.25 = 0.5; batch mean 0.3125
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert mse(logits, torch.tensor([1, 0])).item() == pytest.approx(0.3125, rel=1e-6)


def test_mse_sums_over_classes_not_averages():
    logits = torch.zeros(1, 4)  # uniform 0.25 each, label 0: 0.75^2 + 3 * 0.25^2 = 0.75
    assert mse(logits, torch.tensor([0])).item() == pytest.approx(0.75, rel=1e-6)


def test_ce_and_ls_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    y = torch.tensor([1])
    assert ce(logits, y).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # smoothing s=0.2, K=2: target [0.1, 0.9]
    expected = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75))
    assert ls(logits, y, label_smoothing=0.2).item() == pytest.approx(expected, rel=1e-6)


def test_mse_gradient_matches_the_closed_form():
    # d/dz sum_k (p_k - e_k)^2 = J^T 2(p - e), J = diag(p) - p p^T
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    mse(z, y).backward()
    p = torch.softmax(z.detach(), 1)
    e = torch.nn.functional.one_hot(y, 7).double()
    g = 2 * (p - e)
    expected = p * (g - (p * g).sum(1, keepdim=True)) / 5
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("name", sorted(TEACHER_LOSSES))
def test_gradcheck(name):
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    assert torch.autograd.gradcheck(lambda t: TEACHER_LOSSES[name](t, y, 0.1), (z,))


def test_mse_minimiser_is_the_label_distribution():
    # For a fixed input with label distribution p, argmin_q E||q - e_y||^2 = p.
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    y = torch.multinomial(p, 20_000, replacement=True)  # the minimiser is their frequencies, any count
    z = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        mse(z.expand(len(y), 3), y).backward()
        opt.step()
    freq = torch.bincount(y, minlength=3).float() / len(y)
    torch.testing.assert_close(torch.softmax(z, 1)[0], freq, atol=2e-3, rtol=0)


def fit_linear_mse(n: int, seed: int = 0) -> float:
    """Fit softmax regression with the MSE loss on n gaussian samples; distance to p* on fresh x."""
    rng = np.random.default_rng(seed)
    k, d, var = 5, 6, 2.0
    means = rng.integers(-1, 2, size=(k, d)).astype(np.float64)
    def sample(m):
        y = rng.integers(0, k, m)
        return means[y] + np.sqrt(var) * rng.standard_normal((m, d)), y
    x, y = sample(n)
    xt, _ = sample(20_000)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, k).double()  # p* is a softmax of a linear function here
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    def closure():
        opt.zero_grad()
        loss = mse(model(xs), ys)
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        q = torch.softmax(model(torch.from_numpy(xt)), 1).numpy()
    return float(((q - gaussian_bcpd(xt, means, var)) ** 2).sum(1).mean())


def test_mse_minimiser_approaches_bcpd_with_many_samples():
    few, many = fit_linear_mse(200), fit_linear_mse(50_000)
    assert many < 2e-3
    assert many < few / 5


def test_temperature_scaling_recovers_the_temperature_of_overconfident_logits():
    """Labels drawn from softmax(z), logits given as 2.5 z: the fitted T is 2.5 (to sampling error),
    the validation NLL falls, and no prediction changes."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20_000, 5)) * 1.5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = calibration.fit_temperature(2.5 * z, y)
    assert t == pytest.approx(2.5, rel=0.03)
    assert calibration.nll(2.5 * z, y, t) < calibration.nll(2.5 * z, y) - 0.1
    assert calibration.nll(2.5 * z, y, t) == pytest.approx(calibration.nll(z, y), abs=2e-3)
    assert calibration.fit_temperature(z, y) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("net, shape", [("mlp_teacher", (30,)), ("cnn_teacher", (1, 8, 8)),
                                        ("resnet8", (3, 32, 32)), ("wrn_16_1", (3, 32, 32))])
def test_folding_the_temperature_divides_the_logits(net, shape):
    torch.manual_seed(0)
    model = nets.build(net, 10, shape, {"mean": [0.5] * 3, "std": [0.25] * 3} if len(shape) == 3
                       and shape[0] == 3 else None).eval()
    x = torch.rand(8, *shape)
    with torch.no_grad():
        before = model(x)
        calibration.fold_temperature(model, 2.5, x)
        torch.testing.assert_close(model(x), before / 2.5, rtol=1e-4, atol=1e-5)


def test_folding_refuses_a_net_whose_last_linear_layer_is_not_its_logit_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softplus(), torch.nn.Linear(4, 3),
                                torch.nn.LayerNorm(3)).eval()
    x = torch.rand(5, 4)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(ValueError, match="does not give its logits"):
            calibration.fold_temperature(model, 2.0, x)
        torch.testing.assert_close(model(x), before)  # left as it was
