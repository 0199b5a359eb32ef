"""Classification and calibration metrics on predicted probabilities; the distance to the Bayes
class probability p* where it is known, also at a distillation temperature; and the training
plateau of a curve."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Per equal-width confidence bin (non-empty ones): mean confidence, accuracy and sample count."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            rows.append({"bin": b, "confidence": float(conf[mask].mean()),
                         "accuracy": float(correct[mask].mean()), "count": int(mask.sum())})
    return rows


def ece(probs: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - confidence|."""
    n = len(y)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(probs, y, bins)))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): p softened (T > 1) as KD softens a teacher, softmax(z / T) being exactly
    the tempered softmax(z). Zero probabilities stay zero."""
    with np.errstate(divide="ignore"):
        return softmax(np.log(probs.astype(np.float64)) / temperature)


def bcpd_mse(probs: np.ndarray, bcpd: np.ndarray) -> float:
    """Mean over samples of the squared L2 distance between predicted probabilities and p*."""
    return float(((probs - bcpd) ** 2).sum(1).mean())


def transfer(probs: np.ndarray, bcpd: np.ndarray, temperature: float | None) -> dict[str, float]:
    """The teacher as a student sees it, on the training inputs: bcpd_mse at T = 1 and, with a
    distillation temperature, `bcpd_mse_at_t` between the tempered teacher and the tempered p*."""
    out = {"transfer_bcpd_mse": bcpd_mse(probs, bcpd)}
    if temperature is not None:
        out["transfer_bcpd_mse_at_t"] = bcpd_mse(tempered(probs, temperature), tempered(bcpd, temperature))
    return out


def plateau(curve: list[float], phase: int) -> float | None:
    """How much a per-epoch training accuracy still rose at the end of its first learning-rate
    phase (its first `phase` epochs): the mean over the phase's last fifth minus the mean over the
    fifth before it. Near 0: the phase ran to a plateau. None for a phase under 2 epochs."""
    curve = curve[:phase]
    width = len(curve) // 5 or 1
    if len(curve) < 2 * width:
        return None
    return float(np.mean(curve[-width:]) - np.mean(curve[-2 * width:-width]))


def summary(probs: np.ndarray, y: np.ndarray, bins: int, bcpd: np.ndarray | None = None) -> dict:
    """accuracy, NLL, ECE, Brier score (sum over classes, mean over samples) and, when the Bayes
    class probability p* is known, bcpd_mse: mean squared L2 distance between probs and p*."""
    onehot = np.eye(probs.shape[1])[y]
    out = {
        "accuracy": float((probs.argmax(1) == y).mean()),
        "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-300, None)).mean()),
        "ece": ece(probs, y, bins),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
    }
    if bcpd is not None:
        out["bcpd_mse"] = bcpd_mse(probs, bcpd)
    return out
