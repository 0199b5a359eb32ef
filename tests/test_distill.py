import math

import pytest
import torch

from bayeskd import config, distill
from bayeskd.batch import Batch


def direct_kd(s, t, y, T, a, b):
    """KD evaluated from its definition, sample by sample."""
    total_ce, total_kl = 0.0, 0.0
    for i in range(len(y)):
        ps, pt = torch.softmax(s[i] / T, 0), torch.softmax(t[i] / T, 0)
        total_kl += (pt * (pt.log() - ps.log())).sum()
        total_ce += -torch.log_softmax(s[i], 0)[y[i]]
    return a * total_ce / len(y) + b * T * T * total_kl / len(y)


def test_kd_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g) * 3
    y = torch.randint(0, 5, (8,), generator=g)
    got = distill.logit_loss("kd", s, t, y)  # defaults: T 4, weights 0.1 and 0.9
    torch.testing.assert_close(got, direct_kd(s, t.double(), y, 4.0, 0.1, 0.9), rtol=1e-6, atol=0)
    got = distill.logit_loss("kd", s, t, y, temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    torch.testing.assert_close(got, direct_kd(s, t.double(), y, 2.0, 0.5, 0.5), rtol=1e-6, atol=0)


def test_kd_terms_and_zero_kl_for_equal_logits():
    s = torch.randn(4, 3)
    terms = distill.loss_terms("kd", s, s.clone(), torch.tensor([0, 1, 2, 0]))
    assert set(terms) == {"ce", "kd"} and terms["kd"].abs().item() < 1e-6


def test_none_ignores_the_teacher():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    a = distill.logit_loss("none", s, torch.randn(4, 3), y)
    torch.testing.assert_close(a, torch.nn.functional.cross_entropy(s, y))


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "lskd"])
def test_gradient(method):
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda z: distill.logit_loss(method, z, t, y, epoch=10), (s,))


def test_unknown_method():
    with pytest.raises(ValueError, match="'crd' is not known; expected one of none, kd"):
        distill.logit_loss("crd", torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(TypeError, match="beta"):
        distill.logit_loss("kd", torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), beta=8.0)


def fixed(n=16, k=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, k, generator=g, dtype=torch.float64) * 2, torch.randn(n, k, generator=g) * 3
    return s, t.double(), torch.randint(0, k, (n,), generator=g)


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def ce(z, label):
    return -math.log(softmax(z)[label])


def direct_dkd(s, t, y, epoch, T=4.0, alpha=1.0, beta=8.0, warmup=20):
    """DKD from its definition, sample by sample in plain Python floats."""
    total = 0.0
    for zs, zt, label in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        ps, pt = softmax(zs, T), softmax(zt, T)
        tckd = kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
        rest = [i for i in range(len(zs)) if i != label]
        nckd = kl(softmax([zt[i] for i in rest], T), softmax([zs[i] for i in rest], T))
        # `epoch` counts from 0; the reference's warm-up counts from 1
        total += ce(zs, label) + min((epoch + 1) / warmup, 1) * T * T * (alpha * tckd + beta * nckd)
    return total / len(y)


@pytest.mark.parametrize("epoch", [0, 1, 9, 19, 239])
def test_dkd_matches_its_formula_and_warms_up(epoch):
    s, t, y = fixed()
    got = distill.logit_loss("dkd", s, t, y, epoch).item()
    assert got == pytest.approx(direct_dkd(s, t, y, epoch), rel=1e-6)
    got = distill.logit_loss("dkd", s, t, y, epoch, beta=2.0, temperature=1.0).item()
    assert got == pytest.approx(direct_dkd(s, t, y, epoch, T=1.0, beta=2.0), rel=1e-6)


def test_dkd_warm_up_is_linear_then_flat():
    s, t, y = fixed()
    terms = [distill.loss_terms("dkd", s, t, y, e) for e in (4, 9, 19, 39)]  # epochs 5, 10, 20, 40
    kd_part = [sum(v for k, v in e.items() if k != "ce") for e in terms]
    torch.testing.assert_close(kd_part[1], 2 * kd_part[0])
    torch.testing.assert_close(kd_part[2], 4 * kd_part[0])
    torch.testing.assert_close(kd_part[3], kd_part[2])


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (z - mb) for x, z in zip(a, b, strict=True))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((z - mb) ** 2 for z in b))
    return num / (den + 1e-8)


def direct_dist(s, t, y, tau=4.0):
    ps = [softmax(z, tau) for z in s.tolist()]
    pt = [softmax(z, tau) for z in t.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt, strict=True)) / len(ps)
    cols = range(len(ps[0]))
    intra = 1 - sum(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in cols) / len(cols)
    mean_ce = sum(ce(z, label) for z, label in zip(s.tolist(), y.tolist(), strict=True)) / len(y)
    return mean_ce + tau * tau * (2 * inter + 2 * intra)


def test_dist_matches_its_formula():
    s, t, y = fixed()
    assert distill.logit_loss("dist", s, t, y).item() == pytest.approx(direct_dist(s, t, y), rel=1e-6)


def standardized(z):
    m = sum(z) / len(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
    return [(v - m) / (sd + 1e-7) for v in z]


def test_lskd_matches_its_formula():
    s, t, y = fixed()
    total = 0.0
    for zs, zt, label in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        soft = kl(softmax(standardized(zt), 2.0), softmax(standardized(zs), 2.0))
        total += 0.1 * ce(zs, label) + 9 * 4 * soft
    assert distill.logit_loss("lskd", s, t, y).item() == pytest.approx(total / len(y), rel=1e-6)


def test_lskd_ignores_shift_and_scale_of_the_logits():
    s, t, y = fixed()
    base = distill.loss_terms("lskd", s, t, y)
    teacher_moved = distill.loss_terms("lskd", s, 7.0 * t - 3.0, y)
    student_moved = distill.loss_terms("lskd", 0.5 * s + 2.0, t, y)
    torch.testing.assert_close(sum(teacher_moved.values()), sum(base.values()), rtol=1e-6, atol=0)
    torch.testing.assert_close(student_moved["kd"], base["kd"], rtol=1e-6, atol=0)
    plain_kd = distill.loss_terms("kd", s, 7.0 * t, y)["kd"], distill.loss_terms("kd", s, t, y)["kd"]
    assert not torch.allclose(*plain_kd)


def test_lsdkd_is_dkd_on_standardised_logits_with_its_own_defaults():
    s, t, y = fixed()
    hp = {"temperature": 2.0, "ce_weight": 1.0, "alpha": 9.0, "beta": 72.0, "warmup": 20}
    assert config.hparams("lsdkd") == hp
    zs = torch.tensor([standardized(z) for z in s.tolist()], dtype=s.dtype)
    zt = torch.tensor([standardized(z) for z in t.tolist()], dtype=t.dtype)
    standardised = distill.loss_terms("dkd", zs, zt, y, 20, **hp)
    got = distill.loss_terms("lsdkd", s, t, y, 20)
    torch.testing.assert_close(got["nckd"], standardised["nckd"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["tckd"], standardised["tckd"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["ce"], distill.loss_terms("dkd", s, t, y, 20)["ce"])  # CE on raw logits
    moved = distill.logit_loss("lsdkd", s, 5.0 * t + 1.0, y, 20)
    torch.testing.assert_close(moved, sum(got.values()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["pkt", "cc", "rkd", "crd", "at", "sp", "reviewkd"])
def test_mlps_serve_the_methods_of_pre_logit_vectors_and_refuse_the_others(name):
    from bayeskd import methods, nets
    from bayeskd.taps import Extractor

    student, teacher = nets.build("mlp_student", 3, (30,)), nets.build("mlp_teacher", 3, (30,))
    if methods.FEATURE[name].uses_stages:
        with pytest.raises(ValueError, match=f"{name} matches stage feature maps and the student has none"):
            methods.build(name, student, teacher, (30,), 100)
        return
    method = methods.build(name, student, teacher, (30,), 100)
    x, y = torch.randn(8, 30), torch.randint(0, 3, (8,))
    s, t = Extractor(student), Extractor(teacher)
    terms = method(s(x), t(x), Batch(x, y, torch.arange(8)), 1)
    assert s(x).pooled.shape == (8, 16) and all(torch.isfinite(v) for v in terms.values())
