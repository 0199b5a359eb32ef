"""Feature-based distillation methods, registered by name. The teacher runs online, since its
features depend on the exact input; logit methods (bayeskd.distill) read the cache instead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bayeskd import config
from bayeskd.feature.base import FeatureMethod, paired
from bayeskd.feature.crd import CRD
from bayeskd.feature.hints import AT, VID, FitNet
from bayeskd.feature.hsakd import HSAKD
from bayeskd.feature.relations import CC, PKT, RKD, SP
from bayeskd.feature.reviewkd import ReviewKD
from bayeskd.taps import Extractor, Features

METHODS: dict[str, type[FeatureMethod]] = {
    "fitnet": FitNet, "at": AT, "sp": SP, "cc": CC, "vid": VID, "rkd": RKD, "pkt": PKT,
    "crd": CRD, "reviewkd": ReviewKD, "hsakd": HSAKD,
}

__all__ = ["METHODS", "FeatureMethod", "build", "create", "paired"]


def create(name: str, student: Features, teacher: Features, num_samples: int,
           **hparams: float) -> FeatureMethod:
    """Method `name` sized for these probe features, with its params.yaml defaults (bayeskd.config)
    unless `hparams` overrides them."""
    return METHODS[name](student, teacher, num_samples, **(config.hparams(name) | hparams))


def build(name: str, student: nn.Module, teacher: nn.Module, in_shape: Sequence[int], num_samples: int,
          **hparams: float) -> FeatureMethod:
    """Method `name` for this pair of nets, sized by one probe batch through both (in eval mode, so
    no batch-norm statistics move)."""
    modes = student.training, teacher.training
    probe = torch.zeros(2, *in_shape, device=next(student.parameters()).device)
    with torch.no_grad():
        s = Extractor(student.eval())
        t = Extractor(teacher.eval())
        try:
            s_probe, t_probe = s(probe), t(probe)
        finally:
            s.remove()
            t.remove()
    student.train(modes[0])
    teacher.train(modes[1])
    for role, features in (("student", s_probe), ("teacher", t_probe)):
        if METHODS[name].uses_stages and not features.stages:
            raise ValueError(f"{name} matches stage feature maps and the {role} has none (only a pre-logit "
                             "vector); use nets with stages (the zoo, cnn_teacher, cnn_student)")
    return create(name, s_probe, t_probe, num_samples, **hparams)
