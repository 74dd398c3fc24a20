"""Ternarising a stage's new layers gradually instead of all at once (a config switch; off by default).

Modes (`train.ternary_ramp`), over the first `ternary_ramp_epochs` epochs of a stage; from then on every layer is
fully ternary, so the checkpoints that count (best.pt, the ternary export) always are:
- `magnitude`: incremental ternarisation after INQ (Zhou et al. 2017, arXiv:1702.03044): in every new layer the share
  `start + (1 - start)·epoch/ramp_epochs` of the weights with the largest |w| is ternary, the rest trains in full
  precision and compensates.
- `layer_deep_first` / `layer_early_first`: the new layers become ternary one after the other (evenly spread over the
  ramp); the others train in full precision until their turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RAMP_MODES = ("none", "magnitude", "layer_deep_first", "layer_early_first")


@dataclass(frozen=True)
class RampPlan:
    mode: str = "none"
    epochs: int = 0
    start: float = 0.5

    def __post_init__(self):
        if self.mode not in RAMP_MODES:
            raise ValueError(f"unknown ternary_ramp {self.mode!r}; valid: {', '.join(RAMP_MODES)}")
        if self.mode != "none" and self.epochs < 1:
            raise ValueError(f"ternary_ramp '{self.mode}' needs ternary_ramp_epochs >= 1")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"ternary_ramp_start must be in [0, 1], got {self.start}")

    @property
    def active(self) -> bool:
        return self.mode != "none"


def ramp_shares(plan: RampPlan, epoch: int, n_layers: int) -> list[float]:
    """Share of ternary weights for each of `n_layers` new layers (listed from early to deep) at 0-based `epoch`."""
    if not plan.active or epoch >= plan.epochs:
        return [1.0] * n_layers
    if plan.mode == "magnitude":
        return [plan.start + (1.0 - plan.start) * epoch / plan.epochs] * n_layers
    # layer by layer: the k-th layer in switching order turns ternary at epoch floor(k·epochs/n) (the first at once)
    order = range(n_layers) if plan.mode == "layer_early_first" else reversed(range(n_layers))
    shares = [0.0] * n_layers
    for rank, index in enumerate(order):
        if math.floor(rank * plan.epochs / n_layers) <= epoch:
            shares[index] = 1.0
    return shares
