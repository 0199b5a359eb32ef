"""Classification and calibration metrics on predicted probabilities."""

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
        out["bcpd_mse"] = float(((probs - bcpd) ** 2).sum(1).mean())
    return out
