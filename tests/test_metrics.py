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
