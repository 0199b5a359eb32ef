"""Feature taps: which submodules of a net give its intermediate features, and the hooks that read
them. A leaf module: it imports nothing else of bayeskd.

A net declares its taps (`net.taps = Taps(stages=(...), pre_logit=...)`): the module paths, as
`net.get_submodule` takes them, of its stage outputs from shallow to deep and of its pre-logit
vector. Nets stay untouched otherwise: forward returns the logits only, and an `Extractor` reads
the tapped outputs of each forward pass through forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Taps:
    stages: tuple[str, ...]  # outputs N x C x H x W, shallow to deep; empty for nets without stages
    pre_logit: str  # output N x D, the vector the classifier reads

    def under(self, prefix: str) -> Taps:
        """The same taps of a net held as submodule `prefix` of another."""
        return Taps(tuple(f"{prefix}.{s}" for s in self.stages), f"{prefix}.{self.pre_logit}")


@dataclass
class Features:
    """One forward pass of a net: its logits, its stage outputs and its pre-logit vector."""

    logits: Tensor
    stages: list[Tensor]
    pooled: Tensor
    rerun: Callable[[Tensor], Features] | None = None  # the same net on other inputs


class Extractor:
    """Reads the features of `model`'s forward passes through forward hooks on its declared taps."""

    def __init__(self, model: nn.Module):
        taps: Taps | None = getattr(model, "taps", None)
        if taps is None:
            raise ValueError(f"{type(model).__name__} declares no feature taps (no `taps`)")
        self.model, self.taps = model, taps
        self._outputs: dict[str, Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._keeper(name))
                         for name in (*taps.stages, taps.pre_logit)]

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self._outputs[name] = output

        return keep

    def last(self, logits: Tensor) -> Features:
        """The features of the forward pass that returned `logits` (the model's latest)."""
        out = self._outputs
        return Features(logits, [out[s] for s in self.taps.stages], out[self.taps.pre_logit], rerun=self)

    def __call__(self, x: Tensor) -> Features:
        return self.last(self.model(x))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._outputs.clear()


def features(model: nn.Module, x: Tensor) -> Features:
    """One forward pass of `model` on `x` with its tapped features; no hook stays behind."""
    extractor = Extractor(model)
    try:
        out = extractor(x)
    finally:
        extractor.remove()
    out.rerun = None
    return out
