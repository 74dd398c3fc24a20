"""Standard BitLinear (BitNet b1.58 weights) with the same activation path as BitLinear_TTQ.

Weights: β = mean|W| of the current latent weight (not learned), W_q = clip(round(W/β), −1, 1)·β, straight-through
to the latent weight (`ternary.absmean_ternarize`). The ablation of BitLinear_TTQ: fixed absmean scale instead of
learned Ap/An.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bitlinear_base import BitConv2dBase
from .ternary import absmean_ternarize


class BitLinear_Standard(BitConv2dBase):  # noqa: N801 - pairs with BitLinear_TTQ
    """BitLinear convolution with BitNet b1.58 absmean ternary weights {−β, 0, +β}; no learned scales."""

    def __init__(self, conv: nn.Conv2d, act_bits: int = 8, per_token: bool = True, restore_token_stats: bool = True):
        super().__init__(conv, act_bits, per_token, restore_token_stats)

    @property
    def weight(self) -> torch.Tensor:
        return absmean_ternarize(self.latent_weight)

    def scale_parameters(self) -> list[nn.Parameter]:
        return []
