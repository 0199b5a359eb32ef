"""Hierarchical self-supervision augmented KD (Yang, Xu, An, Xu, IJCAI 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayeskd.batch import Batch
from bayeskd.declare import Float, method
from bayeskd.losses import soft_kl as kl
from bayeskd.methods.base import FeatureMethod, Features, paired
from bayeskd.zoo._layers import GlobalAvgPool, conv_bn

ROTATIONS = 4


def aux_head(channels: int, outputs: int) -> nn.Module:
    """An auxiliary classifier on a stage map: conv3x3-BN-ReLU, global average pool, linear."""
    return nn.Sequential(
        conv_bn(channels, channels, kernel_size=3),
        GlobalAvgPool(),
        nn.Flatten(),
        nn.Linear(channels, outputs),
    )


def rotated(x: Tensor) -> Tensor:
    """x rotated by 90, 180 and 270 degrees, stacked in that order along the batch (3B)."""
    return torch.cat([torch.rot90(x, k, (2, 3)) for k in range(1, ROTATIONS)])


def _square(f: Features, which: str) -> None:
    for m in f.stages:
        if m.shape[-2] != m.shape[-1]:
            raise ValueError(
                f"HSAKD rotates the inputs by 90 degrees, so it needs square images; the {which}'s "
                f"stage maps are {m.shape[-2]}x{m.shape[-1]}"
            )


@method("hsakd", single_process=True,  # reruns the student outside DDP
        weight=Float(1.0, ge=0), ce_weight=Float(1.0, ge=0), joint_weight=Float(1.0, ge=0),
        teacher_weight=Float(1.0, ge=0), temperature=Float(3.0, gt=0))
class HSAKD(FeatureMethod):
    """HSAKD (Yang et al., IJCAI 2021). Every batch is also seen rotated by 90, 180 and 270 degrees
    (4B inputs, rotation r in 0..3); sample i of class y_i at rotation r has the joint label 4 y_i + r.
    Auxiliary heads q^l on the paired stages of both nets predict the 4K joint classes. Terms:
      hsakd_heads:   weight * sum_l T^2 KL(q_t^l / T || q_s^l / T) over the 4B inputs,
      hsakd_logits:  weight * T^2 KL(p_t / T || p_s / T) of the main logits over the 4B inputs,
      hsakd_joint:   joint_weight * sum_l CE(q_s^l, joint label) (the student's own joint task),
      hsakd_teacher: teacher_weight * sum_l CE(q_t^l, joint label) (trains the teacher's heads),
    with T = temperature (3); the base adds CE of the main logits on the unrotated batch.

    Deviations: the paper trains the teacher's heads with the teacher, before distillation; here the
    teacher is given frozen, so its heads train alongside the student on the teacher's detached
    features (their targets are poor in the first epochs). The paper's heads replicate the later
    stages of the net; here each is one conv3x3-BN-ReLU block, pool and linear. The reference student
    script has no hsakd_joint term (joint_weight = 0 gives that). The student sees the rotated copies in
    a second forward pass, so its batch-norm statistics are updated twice per step."""

    def __init__(self, student: Features, teacher: Features, num_samples: int, *, weight: float,
                 ce_weight: float, joint_weight: float, teacher_weight: float,
                 temperature: float):
        super().__init__(ce_weight)
        _square(student, "student")
        _square(teacher, "teacher")
        self.weight = weight
        self.joint_weight = joint_weight
        self.teacher_weight = teacher_weight
        self.temperature = temperature
        joint = ROTATIONS * student.logits.shape[1]
        pairs = paired(student.stages, teacher.stages)
        if not pairs:
            raise ValueError("HSAKD needs nets with stage feature maps")
        self.student_heads = nn.ModuleList(aux_head(fs.shape[1], joint) for fs, _ in pairs)
        self.teacher_heads = nn.ModuleList(aux_head(ft.shape[1], joint) for _, ft in pairs)

    def terms(self, s: Features, t: Features, batch: Batch, epoch: int) -> dict[str, Tensor]:
        if s.rerun is None or t.rerun is None:
            raise ValueError("HSAKD reruns both nets on rotated inputs; the features carry no `rerun`")
        x_rot = rotated(batch.x)
        s_rot = s.rerun(x_rot)
        with torch.no_grad():
            t_rot = t.rerun(x_rot)
        joint = torch.cat([batch.y * ROTATIONS + r for r in range(ROTATIONS)])
        s_maps = [torch.cat(m) for m in zip(s.stages, s_rot.stages, strict=True)]
        t_maps = [torch.cat(m).detach() for m in zip(t.stages, t_rot.stages, strict=True)]
        heads = joint_ce = teacher_ce = 0.0
        for head_s, head_t, (fs, ft) in zip(
            self.student_heads, self.teacher_heads, paired(s_maps, t_maps), strict=True
        ):
            q_s, q_t = head_s(fs), head_t(ft)
            heads = heads + kl(q_s, q_t.detach(), self.temperature)
            joint_ce = joint_ce + F.cross_entropy(q_s, joint)
            teacher_ce = teacher_ce + F.cross_entropy(q_t, joint)
        kl_logits = kl(
            torch.cat([s.logits, s_rot.logits]),
            torch.cat([t.logits, t_rot.logits]).detach(),
            self.temperature,
        )
        return {
            "hsakd_heads": self.weight * heads,
            "hsakd_logits": self.weight * kl_logits,
            "hsakd_joint": self.joint_weight * joint_ce,
            "hsakd_teacher": self.teacher_weight * teacher_ce,
        }
