"""TTQConv2d: a drop-in nn.Conv2d whose forward uses the ternary shadow of a full-precision latent weight."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropin import adopt_conv
from .ternary import SCALE_GRAD_MODES, THRESHOLD_RULES, initial_scales, ternary_threshold, ttq_ternarize


class TTQConv2d(nn.Conv2d):
    """Trained Ternary Quantization convolution.

    Parameters: `latent_weight` (full-precision master weight, trained), `wp` / `wn` (learned positive scales),
    `bias` (if the source conv had one). Buffer: `threshold_factor` t (Δ = t·mean|w| or t·max|w|).

    `weight` is the ternary shadow {−Wn, 0, +Wp}, recomputed from the latent weight; anything that reads
    `conv.weight` (fusing, FLOPs, export) sees the values the forward pass uses. Assigning `weight` (as Ultralytics'
    Conv+BN fusion does) freezes the module into a plain nn.Conv2d holding the assigned weight.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        threshold: float = 0.7,
        rule: str = "mean",
        scale_grad: str = "paper",
        per_channel: bool = False,
    ):
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
        if scale_grad not in SCALE_GRAD_MODES:
            raise ValueError(f"unknown scale_grad {scale_grad!r}; valid: {', '.join(SCALE_GRAD_MODES)}")
        w = adopt_conv(self, conv)
        self.register_buffer("threshold_factor", torch.tensor(float(threshold)))
        self.rule, self.scale_grad, self.per_channel = rule, scale_grad, per_channel
        wp, wn = initial_scales(w, ternary_threshold(w, threshold, rule), per_channel)
        self.wp, self.wn = nn.Parameter(wp), nn.Parameter(wn)

    def settings(self) -> dict:
        """Constructor settings, so the same quantizer can be rebuilt on another model."""
        return {"threshold": float(self.threshold_factor), "rule": self.rule, "scale_grad": self.scale_grad,
                "per_channel": self.per_channel}

    @property
    def weight(self) -> torch.Tensor:
        return ttq_ternarize(self.latent_weight, self.wp, self.wn, self.threshold_factor, self.rule, self.scale_grad)

    def __setattr__(self, name, value):
        if name == "weight" and "latent_weight" in self.__dict__.get("_parameters", {}):
            self._freeze_to_plain_conv(value)
            return
        super().__setattr__(name, value)

    def _freeze_to_plain_conv(self, weight: torch.Tensor) -> None:
        """Turn this module into an ordinary nn.Conv2d holding `weight` (used when BatchNorm is fused into it)."""
        for key in ("latent_weight", "wp", "wn"):
            del self._parameters[key]
        del self._buffers["threshold_factor"]
        for key in ("rule", "scale_grad", "per_channel"):
            self.__dict__.pop(key, None)
        self.__class__ = nn.Conv2d
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.conv2d(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), self.stride,
                        self.padding, self.dilation, self.groups)

    def to_plain_conv(self) -> nn.Conv2d:
        """A stock nn.Conv2d holding exactly the current ternary weights (three values per layer)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.weight.detach())
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv.to(self.latent_weight.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={float(self.threshold_factor):.3g}, rule={self.rule}"
