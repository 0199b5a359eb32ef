"""Methods that match intermediate feature maps of the student to the teacher's, stage by stage."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.declare import Float, method
from bayeskd.methods.base import FeatureMethod, Features, mean_pool, paired


def same_size(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps at the smaller of their two spatial sizes (the larger one average-pooled)."""
    hs, ws = s.shape[-2:]
    ht, wt = t.shape[-2:]
    if hs * ws > ht * wt:
        s = mean_pool(s, (ht, wt))
    elif ht * wt > hs * ws:
        t = mean_pool(t, (hs, ws))
    return s, t


@method("fitnet", weight=Float(100.0, ge=0), ce_weight=Float(1.0, ge=0))
class FitNet(FeatureMethod):
    """FitNets: hints for thin deep nets (Romero et al., ICLR 2015):
    weight * mean((r(f_s) - f_t)^2) on the middle stage pair, r a 1x1 conv + batch norm."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float):
        super().__init__(ce_weight)
        self.weight = weight
        pairs = paired(student.stages, teacher.stages)
        self.index = len(pairs) // 2
        s, t = pairs[self.index]
        self.connector = nn.Sequential(
            nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False), nn.BatchNorm2d(t.shape[1])
        )

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        f_s, f_t = same_size(*paired(s.stages, t.stages)[self.index])
        return {"fitnet": self.weight * F.mse_loss(self.connector(f_s), f_t.detach())}


def attention(f: Tensor, p: float) -> Tensor:
    """The spatial attention map of `f`: mean over channels of |f|^p, flattened and L2-normalised."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


@method("at", weight=Float(1000.0, ge=0), ce_weight=Float(1.0, ge=0), p=Float(2.0, gt=0))
class AT(FeatureMethod):
    """Attention transfer (Zagoruyko and Komodakis, ICLR 2017): weight * sum over stage pairs of
    mean((Q_s - Q_t)^2), Q = vec(mean_c |f|^p) / ||vec(mean_c |f|^p)||_2."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, p: float):
        super().__init__(ce_weight)
        self.weight = weight
        self.p = p

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        loss = 0.0
        for f_s, f_t in paired(s.stages, t.stages):
            f_s, f_t = same_size(f_s, f_t.detach())
            loss = loss + (attention(f_s, self.p) - attention(f_t, self.p)).pow(2).mean()
        return {"at": self.weight * loss}


@method("vid", weight=Float(1.0, ge=0), ce_weight=Float(1.0, ge=0), init_pred_var=Float(5.0, gt=0),
        eps=Float(1e-5, gt=0))
class VID(FeatureMethod):
    """Variational information distillation (Ahn et al., CVPR 2019): per stage pair, the Gaussian
    negative log-likelihood mean(log(sigma_c^2) / 2 + (f_t - mu(f_s))^2 / (2 sigma_c^2)), summed over
    pairs, times weight; mu a 1x1-conv regressor, sigma_c^2 = softplus(alpha_c) + eps."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, init_pred_var: float, eps: float):
        super().__init__(ce_weight)
        self.weight = weight
        self.eps = eps
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()
        alpha = math.log(math.expm1(init_pred_var - eps))
        for s, t in paired(student.stages, teacher.stages):
            c_s, c_t = s.shape[1], t.shape[1]
            self.regressors.append(
                nn.Sequential(
                    nn.Conv2d(c_s, c_t, 1),
                    nn.ReLU(),
                    nn.Conv2d(c_t, c_t, 1),
                    nn.ReLU(),
                    nn.Conv2d(c_t, c_t, 1),
                )
            )
            self.alphas.append(nn.Parameter(torch.full((c_t,), alpha)))

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        loss = 0.0
        for (f_s, f_t), regressor, alpha in zip(
            paired(s.stages, t.stages), self.regressors, self.alphas, strict=True
        ):
            f_s, f_t = same_size(f_s, f_t.detach())
            var = (F.softplus(alpha) + self.eps).view(1, -1, 1, 1)
            loss = loss + 0.5 * ((f_t - regressor(f_s)).pow(2) / var + var.log()).mean()
        return {"vid": self.weight * loss}
