import math

import numpy as np
import pytest
import torch

from bayeskd import methods
from bayeskd.batch import Batch
from bayeskd.taps import Features
from conftest import feature_steps

N = 6
STUDENT = ([(3, 4, 4), (5, 2, 2)], 7)  # stage shapes (C, H, W), pooled width
TEACHER = ([(2, 8, 8), (4, 4, 4), (6, 4, 4)], 9)


Layout = tuple[list[tuple[int, int, int]], int]


def random_features(layout: Layout, seed: int, grad: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)
    shapes, width = layout
    stages = [torch.randn(N, *s, generator=g, dtype=torch.float64).requires_grad_(grad) for s in shapes]
    pooled = torch.randn(N, width, generator=g, dtype=torch.float64).requires_grad_(grad)
    return Features(torch.randn(N, 10, generator=g, dtype=torch.float64), stages, pooled)


def pair(grad: bool = False) -> tuple[Features, Features]:
    return random_features(STUDENT, 1, grad), random_features(TEACHER, 2, grad)


def smooth_l1(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def test_pkt_is_the_kl_of_cosine_kernel_conditionals():
    s, t = pair()
    got = methods.create("pkt", s, t, 100).terms(s, t, None, 1)["pkt"].item()

    eps = 1e-7

    def conditionals(f: np.ndarray) -> np.ndarray:
        k = np.empty((N, N))
        for i in range(N):
            for j in range(N):
                cos = f[i] @ f[j] / ((np.linalg.norm(f[i]) + eps) * (np.linalg.norm(f[j]) + eps))
                k[i, j] = (1 + cos) / 2
        return k / k.sum(1, keepdims=True)

    p_s, p_t = conditionals(s.pooled.detach().numpy()), conditionals(t.pooled.numpy())
    kl = sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps)) for i in range(N) for j in range(N))
    assert got == pytest.approx(30000.0 * kl / N**2, rel=1e-6)


def test_pkt_vanishes_for_identical_relations():
    s, t = pair()
    padded = torch.cat([s.pooled, torch.zeros(N, 2, dtype=torch.float64)], 1)  # the same cosines
    t = Features(t.logits, t.stages, padded)
    assert methods.create("pkt", s, t, 100).terms(s, t, None, 1)["pkt"].item() == pytest.approx(0.0, abs=1e-9)


def test_sp_is_the_frobenius_distance_of_normalised_gram_matrices():
    s, t = pair()
    got = methods.create("sp", s, t, 100).terms(s, t, None, 1)["sp"].item()

    def gram(f: np.ndarray) -> np.ndarray:
        q = f.reshape(N, -1)
        g = np.array([[q[i] @ q[j] for j in range(N)] for i in range(N)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    diff = gram(s.stages[-1].detach().numpy()) - gram(t.stages[-1].numpy())  # the deepest stages only
    assert got == pytest.approx(3000.0 * np.sum(diff**2) / N**2, rel=1e-6)


def test_cc_is_the_mean_product_of_consecutive_embedding_differences():
    s, t = pair()
    method = methods.create("cc", s, t, 100).double()
    got = method.terms(s, t, None, 1)["cc"].item()

    def embed(f: np.ndarray, linear: torch.nn.Linear) -> np.ndarray:
        e = f @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    e_s = embed(s.pooled.detach().numpy(), method.embed_s)
    e_t = embed(t.pooled.detach().numpy(), method.embed_t)
    total = 0.0
    for i in range(N - 1):
        for d in range(e_s.shape[1]):
            total += abs(e_s[i, d] - e_t[i, d]) * abs(e_s[i + 1, d] - e_t[i + 1, d])

    assert method.embed_s.out_features == method.embed_t.out_features == 128
    assert got == pytest.approx(0.02 * total / (N - 1), rel=1e-6)


def test_rkd_is_smooth_l1_on_distances_and_angles():
    s, t = pair()
    got = methods.create("rkd", s, t, 100).terms(s, t, None, 1)["rkd"].item()

    def distances(f: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(N)] for i in range(N)])
        return d / np.mean([d[i, j] for i in range(N) for j in range(N) if i != j])

    def angles(f: np.ndarray) -> np.ndarray:
        a = np.zeros((N, N, N))
        for i in range(N):
            for j in range(N):
                for k in range(N):
                    if i != j and k != j:
                        u, v = f[i] - f[j], f[k] - f[j]
                        a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    f_s, f_t = s.pooled.detach().numpy(), t.pooled.numpy()
    loss_d = smooth_l1(distances(f_s) - distances(f_t)).mean()
    loss_a = smooth_l1(angles(f_s) - angles(f_t)).mean()
    assert got == pytest.approx(25.0 * loss_d + 50.0 * loss_a, rel=1e-6)


def test_rkd_is_invariant_to_rotation_scale_and_shift_of_the_student():
    s, t = pair()
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    moved = Features(s.logits, s.stages, 3.0 * s.pooled @ q + 1.5)
    method = methods.create("rkd", s, t, 100)
    assert method.terms(moved, t, None, 1)["rkd"].item() == pytest.approx(
        method.terms(s, t, None, 1)["rkd"].item(), rel=1e-9
    )


@pytest.mark.parametrize("name", ["pkt", "sp", "cc", "rkd"])
def test_training_lowers_the_term(name):
    history = feature_steps(name)
    assert all(math.isfinite(v) for step in history for v in step.values())
    assert set(history[0]) == {"ce", name}
    assert np.mean([h[name] for h in history[-5:]]) < history[0][name]


@pytest.mark.parametrize("name", ["pkt", "sp", "cc", "rkd"])
def test_gradients_reach_the_student_and_the_method_not_the_teacher(name):
    s, t = pair(grad=True)
    method = methods.create(name, s, t, 100).double()
    method.terms(s, t, None, 1)[name].backward()
    assert all(f.grad is None for f in [*t.stages, t.pooled])
    used = s.stages[-1] if name == "sp" else s.pooled
    assert used.grad is not None and torch.isfinite(used.grad).all() and used.grad.abs().sum() > 0
    if name == "cc":
        assert {n.split(".")[0] for n, _ in method.named_parameters()} == {"embed_s", "embed_t"}
    else:
        assert not list(method.parameters())
    for p in method.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_rkd_on_a_zoo_pair():
    history = feature_steps(
        "rkd", student_net="resnet8", teacher_net="resnet14", in_shape=(3, 32, 32), steps=3, n=16
    )
    assert all(math.isfinite(v) for step in history for v in step.values())


@pytest.mark.parametrize("name", ["pkt", "sp", "cc", "rkd"])
def test_terms_are_computed_in_float32_under_bf16_autocast(name):
    s, t = (
        Features(f.logits.float(), [x.bfloat16() for x in f.stages], f.pooled.bfloat16().relu())
        for f in pair()
    )
    method = methods.create(name, s, t, 100)
    batch = Batch(torch.zeros(N, 1), torch.zeros(N, dtype=torch.long), torch.arange(N))
    exact = method(
        *(Features(f.logits, [x.float() for x in f.stages], f.pooled.float()) for f in (s, t)), batch, 1
    )[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = method(s, t, batch, 1)[name]  # the method's declaration: in_float32
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["pkt", "sp", "cc", "rkd"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_last_batches_give_finite_terms(name, n):
    # an epoch's last batch can hold a single sample
    history = feature_steps(name, steps=1, n=n)
    assert all(math.isfinite(v) for v in history[0].values())
