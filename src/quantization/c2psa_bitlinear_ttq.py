"""BitLinear_TTQ: BitLinear activations (LayerNorm + 8-bit absmax) with TTQ ternary weights {−An, 0, +Ap}.

The weights come from the TTQ math of `ternary.py` (ttq_ternarize: threshold Δ = t·mean|w| of the latent weight,
learned scales Ap/An, the paper's gradients); the activation path is `bitlinear_base`. Drop-in for any nn.Conv2d
inside C2PSA (1x1 qkv/proj/ffn convs and the depthwise 3x3 positional-encoding conv).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bitlinear_base import BitConv2dBase
from .ternary import SCALE_GRAD_MODES, THRESHOLD_RULES, initial_scales, ternary_threshold, ttq_ternarize


class BitLinear_TTQ(BitConv2dBase):  # noqa: N801 - the name used by the project's plan and papers
    """BitLinear convolution with TTQ weights.

    Parameters: `latent_weight`, `wp` / `wn` (the learned Ap / An, scalars, initialised as mean|w| over the positive
    and negative sets of the replaced conv's weight), `norm` (LayerNorm), `bias`. Buffers: `threshold_factor`,
    `out_scale`. `weight` is the ternary tensor {−An, 0, +Ap} the forward pass uses.
    """

    def __init__(self, conv: nn.Conv2d, threshold: float = 0.7, rule: str = "mean", scale_grad: str = "paper",
                 act_bits: int = 8, per_token: bool = True, restore_token_stats: bool = True):
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
        if scale_grad not in SCALE_GRAD_MODES:
            raise ValueError(f"unknown scale_grad {scale_grad!r}; valid: {', '.join(SCALE_GRAD_MODES)}")
        super().__init__(conv, act_bits, per_token, restore_token_stats)
        w = self.latent_weight.detach()
        self.register_buffer("threshold_factor", torch.tensor(float(threshold), device=w.device))
        self.rule, self.scale_grad = rule, scale_grad
        ap, an = initial_scales(w, ternary_threshold(w, threshold, rule), per_channel=False)
        self.wp, self.wn = nn.Parameter(ap), nn.Parameter(an)

    @property
    def ap(self) -> nn.Parameter:
        return self.wp

    @property
    def an(self) -> nn.Parameter:
        return self.wn

    def settings(self) -> dict:
        return {"threshold": float(self.threshold_factor), "rule": self.rule, "scale_grad": self.scale_grad,
                **super().settings()}

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.wp, self.wn]

    @property
    def weight(self) -> torch.Tensor:
        return ttq_ternarize(self.latent_weight, self.wp, self.wn, self.threshold_factor, self.rule, self.scale_grad)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={float(self.threshold_factor):.3g}, rule={self.rule}"
