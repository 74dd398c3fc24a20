"""The activation path shared by the BitLinear convolutions of C2PSA (BitLinear_TTQ and standard BitLinear).

Every pixel is a token (as in BitNet); over its channels:
  1. LayerNorm with learnable affine       u = g·(x − μ)/σ + b
  2. 8-bit absmax quantisation             codes = clip(round(u·Q/γ), −Q−1, Q), Q = 127, γ = max|u| (STE)
  3. convolution with the ternary weight   c = W_t ⊛ codes
  4. rescale by γ/Q and add the bias       y = (γ/Q)·c + bias

Token statistics (`restore_token_stats`, on by default). BitNet's BitLinear feeds the normalised activation to the
matmul, which suits training from scratch. A pretrained conv expects the raw activation, whose per-token scale σ and
mean μ the LayerNorm removes; without them the replaced layer no longer computes anything close to the conv it
replaces. With `restore_token_stats` they are put back after the quantised conv:
    y = σ·(γ/Q)·(W_t ⊛ codes) + μ·(W_t ⊛ 1) + bias
which, with the LayerNorm's initial affine (g = 1, b = 0), equals W_t ⊛ x + bias up to the 8-bit rounding: the
layer starts from the pretrained function. The quantised tensor is still the normalised, mean-free activation.

For a 1x1, stride-1, unpadded conv (qkv, proj, ffn) the integer conv runs on the codes and the per-token rescale
follows, as above. For a spatial kernel (the depthwise 3x3 `pe` conv) neighbouring tokens have different scales, so
the codes are dequantised first (x̃ = codes·γ/Q [·σ + μ]) and the conv runs on x̃: the same function, exact there.

A BatchNorm folded into the layer (Ultralytics' Conv+BN fusion assigns `weight` and `bias`) becomes a per-channel
`out_scale` on the conv output; the ternary weight, LayerNorm and activation quantisation stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ternary import absmax_quantize
from .dropin import adopt_conv


def token_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the channel dim of an NCHW tensor (each pixel a token): (g·x̂ + b, μ, σ), μ/σ of shape N1HW."""
    mean = x.mean(dim=1, keepdim=True)
    centred = x - mean
    std = (centred.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    u = centred / std
    if weight is not None:
        u = u * weight.view(1, -1, 1, 1)
    if bias is not None:
        u = u + bias.view(1, -1, 1, 1)
    return u, mean, std


def quantize_tokens(x: torch.Tensor, norm_weight, norm_bias, eps: float = 1e-5, bits: int = 8, per_token: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm then absmax quantisation: (integer codes in [−2^(b−1), 2^(b−1)−1], γ, μ, σ)."""
    u, mean, std = token_layer_norm(x, norm_weight, norm_bias, eps)
    codes, gamma = absmax_quantize(u, bits, per_token, dim=1)
    return codes, gamma, mean, std


def is_pointwise(kernel_size, stride, padding) -> bool:
    """True when output pixel (i, j) reads only input pixel (i, j): per-token rescaling after the conv is exact."""
    return tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def bitlinear_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight, norm_bias,
                     *, eps: float = 1e-5, bits: int = 8, per_token: bool = True, restore_token_stats: bool = True,
                     out_scale: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     groups: int = 1) -> torch.Tensor:
    """The BitLinear convolution (module docstring): LayerNorm, absmax codes, conv with `weight`, rescale, bias.

    `weight` is the (ternary) weight to convolve with; `out_scale` a per-output-channel factor (a folded BatchNorm)."""
    xf = x.float()
    codes, gamma, mean, std = quantize_tokens(xf, norm_weight, norm_bias, eps, bits, per_token)
    q = 2 ** (bits - 1) - 1
    token_scale = gamma / q * std if restore_token_stats else gamma / q
    w = weight.float()
    if is_pointwise(w.shape[2:], stride, padding):
        y = F.conv2d(codes, w, None, stride, padding, dilation, groups) * token_scale
        if restore_token_stats:
            y = y + mean * w.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    else:
        dequant = codes * token_scale + mean if restore_token_stats else codes * token_scale
        y = F.conv2d(dequant, w, None, stride, padding, dilation, groups)
    if out_scale is not None:
        y = y * out_scale.float().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(x.dtype)


@torch.no_grad()
def channel_fold_scale(folded: torch.Tensor, weight: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """The per-output-channel factor s with folded = s·weight (least squares per channel; 1 where the channel's weight
    is all zero, as only the bias reaches its output). Raises ValueError when `folded` is not such a rescale."""
    f, w = folded.detach().float(), weight.detach().float()
    dims = tuple(range(1, w.dim()))
    ww = (w * w).sum(dim=dims)
    s = torch.where(ww > 0, (f * w).sum(dim=dims) / ww.clamp_min(1e-30), torch.ones_like(ww))
    resid = (f - s.view(-1, *([1] * (w.dim() - 1))) * w).abs().max()
    tol = (rtol if rtol is not None else 64 * torch.finfo(folded.dtype).eps) * f.abs().max().clamp_min(1e-12)
    if resid > tol:
        raise ValueError("a BitLinear layer takes only a per-output-channel rescale of its ternary weight as a new "
                         f"`weight` (a BatchNorm fold); this one differs from that by {float(resid):.3g}")
    return s


class BitConv2dBase(nn.Conv2d):
    """nn.Conv2d drop-in with the BitLinear activation path; subclasses define the ternary `weight` property.

    Parameters: `latent_weight` (full-precision master weight, copied from the replaced conv), `norm` (LayerNorm over
    the input channels, learnable affine), `bias` (if the conv had one). Buffer: `out_scale` (per output channel,
    ones until a BatchNorm is folded in). `act_bits` / `per_token` describe the activation quantisation.
    """

    def __init__(self, conv: nn.Conv2d, act_bits: int = 8, per_token: bool = True, restore_token_stats: bool = True):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d to replace, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("BitLinear layers support numeric zero padding only")
        if not 2 <= int(act_bits) <= 16:
            raise ValueError(f"act_bits must be in [2, 16], got {act_bits}")
        w = adopt_conv(self, conv)
        self.norm = nn.LayerNorm(self.in_channels).to(w.device)
        self.register_buffer("out_scale", torch.ones(self.out_channels, device=w.device))
        self.act_bits, self.per_token, self.restore_token_stats = int(act_bits), bool(per_token), bool(restore_token_stats)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **settings):
        """Built from the conv it replaces (its weight becomes the latent weight)."""
        return cls(conv, **settings)

    def settings(self) -> dict:
        return {"act_bits": self.act_bits, "per_token": self.per_token, "restore_token_stats": self.restore_token_stats}

    def scale_parameters(self) -> list[nn.Parameter]:
        return []

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __setattr__(self, name, value):
        if name == "weight" and "latent_weight" in self.__dict__.get("_parameters", {}):
            self.fold_weight(value)
            return
        super().__setattr__(name, value)

    @torch.no_grad()
    def fold_weight(self, folded: torch.Tensor) -> None:
        """Absorb an assigned weight that is a per-channel rescale of the current one (a BatchNorm fold) into
        `out_scale`; the ternary weight itself is unchanged."""
        current = self.weight.detach()  # what Ultralytics read and rescaled (out_scale is not part of it)
        s = channel_fold_scale(folded.to(current.dtype), current)
        self.out_scale.mul_(s.to(self.out_scale.dtype))

    def activation_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes, γ) of the quantised, normalised input."""
        codes, gamma, _, _ = quantize_tokens(x.float(), self.norm.weight, self.norm.bias, self.norm.eps,
                                             self.act_bits, self.per_token)
        return codes, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear_conv2d(x, self.weight, self.bias, self.norm.weight, self.norm.bias, eps=self.norm.eps,
                                bits=self.act_bits, per_token=self.per_token,
                                restore_token_stats=self.restore_token_stats, out_scale=self.out_scale,
                                stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", act_bits={self.act_bits}, per_token={self.per_token}, "
                f"restore_token_stats={self.restore_token_stats}")
