import pytest
import torch

from bayeskd import distill


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
    a = distill.logit_loss("none", s, torch.randn(4, 3), y, temperature=4.0)
    torch.testing.assert_close(a, torch.nn.functional.cross_entropy(s, y))


def test_kd_gradient():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(lambda z: distill.logit_loss("kd", z, t, y), (s,))


def test_unknown_method():
    with pytest.raises(ValueError, match="'crd' is not known; expected one of none, kd"):
        distill.logit_loss("crd", torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))
