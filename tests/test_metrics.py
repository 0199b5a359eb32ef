import numpy as np
import pytest

from bayeskd import metrics


def test_summary_hand_computed():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    bcpd = np.array([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    s = metrics.summary(probs, y, bins=2, bcpd=bcpd)
    assert s["accuracy"] == 0.75
    assert s["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    # bins [0, .5), [.5, 1]: all four confidences (.9 .6 .7 .8) in bin 1, mean .75, accuracy .75
    assert s["ece"] == pytest.approx(0.0)
    assert s["brier"] == pytest.approx(np.mean([0.02, 0.72, 0.18, 0.08]))
    assert s["bcpd_mse"] == pytest.approx(np.mean([0.02, 0.02, 0.08, 0.08]))


def test_ece_two_bins():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    y = np.array([0, 1, 0, 0])
    # bins of width .1 over [0, 1]: bin 9 conf .95 acc .5, bin 5 conf .55 acc 1
    assert metrics.ece(probs, y, bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    rows = metrics.reliability(probs, y, bins=10)
    assert [(r["bin"], r["count"]) for r in rows] == [(5, 2), (9, 2)]


def test_softmax_is_stable():
    p = metrics.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_tempered_is_the_softmax_of_the_logits_over_t():
    z = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    for t in (0.5, 1.0, 4.0):
        np.testing.assert_allclose(metrics.tempered(metrics.softmax(z), t), metrics.softmax(z / t),
                                   atol=1e-12)
    hard = metrics.tempered(np.array([[1.0, 0.0]]), 4.0)  # a zero stays zero at any temperature
    np.testing.assert_array_equal(hard, [[1.0, 0.0]])


def test_transfer_hand_computed():
    probs = np.array([[0.8, 0.2], [0.5, 0.5]])
    bcpd = np.array([[0.6, 0.4], [0.5, 0.5]])
    assert metrics.transfer(probs, bcpd, None) == {"transfer_bcpd_mse": pytest.approx((0.04 + 0.04) / 2)}
    # at T = 2: softmax(log p / 2) of [0.8, 0.2] is [2/3, 1/3]; of [0.6, 0.4] is
    # [sqrt .6, sqrt .4] / (sqrt .6 + sqrt .4); the second rows are both uniform
    a = np.sqrt(0.6) / (np.sqrt(0.6) + np.sqrt(0.4))
    out = metrics.transfer(probs, bcpd, 2.0)
    assert out["transfer_bcpd_mse_at_t"] == pytest.approx(2 * (2 / 3 - a) ** 2 / 2)
    assert out["transfer_bcpd_mse"] == pytest.approx(0.04)


def test_softening_can_reverse_which_teacher_is_closer_to_p_star():
    """The case the transfer-set metric exists for: a teacher closer to p* at T = 1 can be further
    from it once both are softened (here the overconfident one: softening magnifies its tiny
    probabilities' log-ratios)."""
    bcpd = np.array([[0.90, 0.05, 0.05]])
    sharp, flat = np.array([[0.99, 0.005, 0.005]]), np.array([[0.75, 0.20, 0.05]])
    at = lambda q, t: metrics.transfer(q, bcpd, t)["transfer_bcpd_mse_at_t"]  # noqa: E731
    assert at(sharp, 1.0) < at(flat, 1.0)
    assert at(flat, 4.0) < at(sharp, 4.0)


def test_plateau_compares_the_last_fifth_of_the_first_phase_with_the_fifth_before():
    curve = [0.1 * i for i in range(10)] + [5.0] * 5  # the phase is the first 10 epochs
    assert metrics.plateau(curve, 10) == pytest.approx((0.8 + 0.9) / 2 - (0.6 + 0.7) / 2)
    assert metrics.plateau([0.5] * 12, 12) == 0.0
    assert metrics.plateau([0.2, 0.3], 2) == pytest.approx(0.1)
    assert metrics.plateau([0.2], 1) is None
