"""Methods that match relations between the samples of a batch, as the teacher's features see them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.declare import Float, Int, method
from bayeskd.methods.base import FeatureMethod, Features


@method("pkt", uses_stages=False, in_float32=True, weight=Float(30000.0, ge=0), ce_weight=Float(1.0, ge=0),
        eps=Float(1e-7, gt=0))
class PKT(FeatureMethod):
    """Probabilistic knowledge transfer (Passalis and Tefas, ECCV 2018): on pooled features, with
    K_ij = (1 + cos(f_i, f_j)) / 2 and P_ij = K_ij / sum_j K_ij, weight * mean_ij P^t_ij log(P^t_ij / P^s_ij)
    (eps added inside the log)."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, eps: float):
        super().__init__(ce_weight)
        self.weight = weight
        self.eps = eps

    def conditional(self, f: Tensor) -> Tensor:
        f = f / (f.norm(dim=1, keepdim=True) + self.eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdim=True)

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        p_s, p_t = self.conditional(s.pooled), self.conditional(t.pooled.detach())
        kl = p_t * torch.log((p_t + self.eps) / (p_s + self.eps))
        return {"pkt": self.weight * kl.mean()}


def similarity(f: Tensor) -> Tensor:
    """The batch Gram matrix of the flattened maps, each row L2-normalised."""
    f = f.flatten(1)
    return F.normalize(f @ f.T, dim=1)


@method("sp", in_float32=True, weight=Float(3000.0, ge=0), ce_weight=Float(1.0, ge=0))
class SP(FeatureMethod):
    """Similarity-preserving KD (Tung and Mori, ICCV 2019): on the deepest stages,
    weight * ||G_s - G_t||_F^2 / b^2, G = row-L2-normalised batch Gram matrix of the flattened maps."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float):
        super().__init__(ce_weight)
        self.weight = weight

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        g_s, g_t = similarity(s.stages[-1]), similarity(t.stages[-1].detach())
        return {"sp": self.weight * (g_s - g_t).pow(2).sum() / len(g_s) ** 2}


@method("cc", uses_stages=False, in_float32=True, weight=Float(0.02, ge=0), ce_weight=Float(1.0, ge=0),
        embed_dim=Int(128, gt=0))
class CC(FeatureMethod):
    """Correlation congruence (Peng et al., ICCV 2019), in the batch form of the CRD benchmark
    implementation (Tian et al., ICLR 2020), whose weight 0.02 the default follows, rather than the paper's
    kernel form: with e^s, e^t the L2-normalised linear embeddings of the student's and teacher's pooled
    features (one per net, both trained) and delta_i = |e^s_i - e^t_i| element-wise,
    weight * 1/(b-1) sum_{i=0}^{b-2} sum_d delta_id delta_(i+1)d, products of consecutive samples' embedding
    differences."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, embed_dim: int):
        super().__init__(ce_weight)
        self.weight = weight
        self.embed_s = nn.Linear(student.pooled.shape[1], int(embed_dim))
        self.embed_t = nn.Linear(teacher.pooled.shape[1], int(embed_dim))

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        e_s = F.normalize(self.embed_s(s.pooled), dim=1)
        e_t = F.normalize(self.embed_t(t.pooled.detach()), dim=1)
        delta = (e_s - e_t).abs()
        pairs = max(len(delta) - 1, 1)  # a batch of one sample has no pair: the term is 0
        return {"cc": self.weight * (delta[:-1] * delta[1:]).sum() / pairs}


def distances(f: Tensor) -> Tensor:
    """Pairwise Euclidean distances between the rows of `f`, divided by their mean over pairs i != j."""
    d = (f[:, None] - f[None]).norm(dim=2)
    n = len(f)
    return d / (d.sum() / max(n * (n - 1), 1)).clamp_min(1e-12)  # one sample: no pairs, all 0


def angles(f: Tensor) -> Tensor:
    """The cosine of the angle at j of every triplet (i, j, k): <e_ij, e_kj>, e_ij = unit(f_i - f_j)."""
    e = F.normalize(f[:, None] - f[None], dim=2)
    return e.transpose(0, 1) @ e.permute(1, 2, 0)


@method("rkd", uses_stages=False, in_float32=True, weight=Float(1.0, ge=0), ce_weight=Float(1.0, ge=0),
        distance_weight=Float(25.0, ge=0), angle_weight=Float(50.0, ge=0))
class RKD(FeatureMethod):
    """Relational KD (Park et al., CVPR 2019) on pooled features: weight * (distance_weight *
    smoothL1(psi_D^s, psi_D^t) + angle_weight * smoothL1(psi_A^s, psi_A^t)), psi_D the pairwise distances
    over their mean, psi_A the triplet angle cosines, both losses averaged over all entries."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, distance_weight: float, angle_weight: float):
        super().__init__(ce_weight)
        self.weight = weight
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        f_s, f_t = s.pooled, t.pooled.detach()
        loss_d = F.smooth_l1_loss(distances(f_s), distances(f_t))
        loss_a = F.smooth_l1_loss(angles(f_s), angles(f_t))
        return {"rkd": self.weight * (self.distance_weight * loss_d + self.angle_weight * loss_a)}
