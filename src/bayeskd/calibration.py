"""Post-hoc temperature scaling (Guo et al., ICML 2017): one scalar T, fitted after training by
minimising the negative log-likelihood of softmax(z / T) on held-out data, then folded into the
net's logit layer, so that every reader of the weights (the logit cache, online and feature KD,
evaluate, ONNX export) sees the calibrated net with no special case.

Dividing the logits by T changes no prediction (the argmax stays), only their confidence.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# the key of the fitted T in the header of the teacher's weights file (bayeskd.nets.save_weights)
METADATA_KEY = "calibration_temperature"
# the search range of log T: T from 1/e^5 to e^5 (0.007 to 148)
LOG_T_BOUNDS = (-5.0, 5.0)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T), in float64."""
    from scipy.special import logsumexp

    z = logits.astype(np.float64) / temperature
    return float((logsumexp(z, axis=1) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises nll(logits, y, T). The NLL is convex in 1/T, so it has one minimum
    over log T, found by a bounded Brent search (deterministic)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-7})
    return float(np.exp(found.x))


def logit_layer(model: nn.Module) -> nn.Linear:
    """The net's last linear layer, which computes its logits in every net of bayeskd.nets."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to fold a temperature into")
    return linears[-1]


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float, probe: torch.Tensor) -> None:
    """Divide the logit layer's weight and bias by T in place, so that the model computes z / T.
    Checked on `probe` inputs: ValueError (the model left as it was) if the outputs are not the
    old logits divided by T, i.e. the last linear layer is not the one that gives the logits. Run
    where the model is (the probe moves there)."""
    model.eval()
    layer = logit_layer(model)
    probe = probe.to(layer.weight.device)
    before = model(probe)
    weight, bias = layer.weight.clone(), None if layer.bias is None else layer.bias.clone()
    layer.weight.div_(temperature)
    if layer.bias is not None:
        layer.bias.div_(temperature)
    if not torch.allclose(model(probe), before / temperature, rtol=1e-4, atol=1e-5):
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        raise ValueError(f"the last linear layer of {type(model).__name__} does not give its logits")
