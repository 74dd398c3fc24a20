"""Shared set-up of quantized drop-in convolutions (TTQConv2d, BitLinear layers)."""

from __future__ import annotations

import torch
import torch.nn as nn


def adopt_conv(module: nn.Conv2d, conv: nn.Conv2d) -> torch.Tensor:
    """Initialise a quantized drop-in from the conv it replaces: nn.Module state, the conv's geometry, its weight as
    the FP32 `latent_weight` parameter and its bias. (Not nn.Conv2d.__init__: `weight` is a property of drop-ins.)
    Returns the latent weight's data."""
    nn.Module.__init__(module)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                 "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
        setattr(module, name, getattr(conv, name))
    w = conv.weight.detach().clone().float()
    module.latent_weight = nn.Parameter(w)
    module.register_parameter("bias", nn.Parameter(conv.bias.detach().clone().float()) if conv.bias is not None else None)
    return w
