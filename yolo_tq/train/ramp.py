"""Ternarising a stage's new layers gradually instead of all at once (a config switch; off by default).

Modes (`train.ternary_ramp`), over the first `ternary_ramp_epochs` epochs of a stage; from then on every layer is
fully ternary, so the checkpoints that count (best.pt, the ternary export) always are.
- `magnitude`: incremental ternarisation after INQ (Zhou et al. 2017, arXiv:1702.03044): in every new layer the share
  `start + (1 - start)·epoch/ramp_epochs` of the weights with the largest |w| is ternary, the rest trains in full
  precision and compensates.
- `layer_deep_first` / `layer_early_first`: the new layers become ternary one after the other (evenly spread over the
  ramp); the others train in full precision until their turn.
`train.ternary_freeze_epochs` (independent of the ramp): in a stage's last N epochs the new layers' latent weights stop
training, so their ternary pattern is fixed while the scales, BatchNorm and full-precision layers settle around it
(weights that flip back and forth across the threshold late in training hurt; after Nagel et al. 2022,
arXiv:2203.11086, which freezes oscillating weights).
"""

from __future__ import annotations

import math

from ..plan import RampPlan

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
