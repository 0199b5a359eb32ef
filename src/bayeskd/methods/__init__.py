"""Distillation methods, each declared beside its code with `bayeskd.declare.method` (its name,
hyperparameters with defaults and bounds, flags). Every module of this package is imported and its
declared methods registered in `METHODS`, so a new method is a new module.

Logit methods are functions `(student_logits, teacher_logits, targets, epoch, **hparams) ->
{term: loss}` (`logit`): they need only the teacher's logits, so they run from the logit cache.
Feature methods are `FeatureMethod` subclasses (`base`): they need the teacher's features, which
depend on the exact input, so the teacher runs online. `epoch` counts from 0 in every method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bayeskd import declare
from bayeskd.methods.base import FeatureMethod, paired
from bayeskd.taps import Features, features

METHODS: dict[str, declare.MethodDecl] = declare.collect(__name__, __path__, declare.MethodDecl)
LOGIT = {name: m.impl for name, m in METHODS.items() if not isinstance(m.impl, type)}
FEATURE: dict[str, type[FeatureMethod]] = {
    name: m.impl for name, m in METHODS.items() if isinstance(m.impl, type)
}

__all__ = ["FEATURE", "LOGIT", "METHODS", "FeatureMethod", "build", "create", "paired"]


def create(name: str, student: Features, teacher: Features, num_samples: int,
           **hparams: float) -> FeatureMethod:
    """Feature method `name` sized for these probe features, with its declared defaults unless
    `hparams` overrides them."""
    return FEATURE[name](student, teacher, num_samples, **(METHODS[name].defaults() | hparams))


def build(name: str, student: nn.Module, teacher: nn.Module, in_shape: Sequence[int], num_samples: int,
          **hparams: float) -> FeatureMethod:
    """Feature method `name` for this pair of nets, sized by one probe batch through each, on its own
    device (in eval mode, so no batch-norm statistics move)."""
    s_probe, t_probe = _probe(student, in_shape), _probe(teacher, in_shape)
    for role, probe in (("student", s_probe), ("teacher", t_probe)):
        if FEATURE[name].uses_stages and not probe.stages:
            raise ValueError(f"{name} matches stage feature maps and the {role} has none (only a pre-logit "
                             "vector); use nets with stages (the zoo, cnn_teacher, cnn_student)")
    return create(name, s_probe, t_probe, num_samples, **hparams)


def _probe(net: nn.Module, in_shape: Sequence[int]) -> Features:
    """The features of two zero inputs, on the net's own device, in eval mode; the mode is restored."""
    mode = net.training
    probe = torch.zeros(2, *in_shape, device=next(net.parameters()).device)
    with torch.no_grad():
        out = features(net.eval(), probe)
    net.train(mode)
    return out
