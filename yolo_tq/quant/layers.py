"""Quantized drop-in convolutions: one base (QuantConv2d) with an injected weight quantizer.

Weight quantizers (nn.Modules, `module.quantizer`): TTQWeight (ternary {-Wn, 0, +Wp}, learned Wp/Wn, the TTQ math of
`ternary.py`), LSQWeight (integer codes of 2-8 bits, a learned step per output channel), AbsmeanWeight (BitNet b1.58,
fixed absmean scale) and FixedWeight (a stored ternary tensor, for packed files). Layers: GridConv2d (plain conv on
the quantized weight) as TTQConv2d and IntConv2d, and the BitLinear family (BitConv2d: LayerNorm, 8-bit
absmax activations, conv on the quantized weight) as BitLinear_TTQ, BitLinear_Standard and PackedBitLinear.

Every layer keeps the replaced conv's weight as the FP32 `latent_weight` parameter and exposes the weight its forward
uses as the `weight` property, so anything that reads `conv.weight` (Ultralytics' fusion, FLOPs, export) sees it.

The BitLinear activation path:

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

from .spec import QuantSpec, SpecError
from .ternary import (absmax_quantize, absmean_ternarize, initial_scales, lsq_initial_step, lsq_quantize,
                      partial_ternarize, ternary_threshold, ttq_ternarize)


# ------------------------------------------------------------------------------------------ BitLinear functions
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



# ---------------------------------------------------------------------------------------------- weight quantizers
class TTQWeight(nn.Module):
    """TTQ: {-Wn, 0, +Wp} with Δ = t·mean|w| (or t·max|w|) of the latent weight; Wp/Wn learned, initialised as the
    mean |w| of the positive and negative sets. `threshold_factor` holds t: a buffer, or a Parameter when the spec
    learns it (kept ≥ 0 in the forward)."""

    def __init__(self, latent: torch.Tensor, spec: QuantSpec):
        super().__init__()
        self.rule, self.scale_grad = spec.rule, spec.scale_grad
        self.threshold_per_channel = spec.threshold_per_channel
        self.share = 1.0  # incremental ternarisation: share of the weights (largest |w| first) that are ternary
        factor = torch.tensor(float(spec.threshold), device=latent.device)
        if spec.learn_threshold:
            self.threshold_factor = nn.Parameter(factor)
        else:
            self.register_buffer("threshold_factor", factor)
        delta = ternary_threshold(latent, spec.threshold, spec.rule, spec.threshold_per_channel)
        wp, wn = initial_scales(latent, delta, spec.per_channel)
        self.wp, self.wn = nn.Parameter(wp), nn.Parameter(wn)

    def __setstate__(self, state):
        """A module pickled before `share` and `threshold_per_channel` existed reads with their defaults."""
        state.setdefault("share", 1.0)
        state.setdefault("threshold_per_channel", False)
        super().__setstate__(state)

    def factor(self) -> torch.Tensor:
        """t of Δ = t·mean|w| (a learned t is kept >= 0)."""
        return self.threshold_factor.clamp_min(0) if self.threshold_factor.requires_grad else self.threshold_factor

    def delta(self, latent: torch.Tensor) -> torch.Tensor:
        """The threshold Δ of `latent` (a scalar, or one per output channel with spec.threshold_per_channel)."""
        return ternary_threshold(latent, self.factor(), self.rule, self.threshold_per_channel)

    def ternary(self, latent: torch.Tensor) -> torch.Tensor:
        """The fully ternary weight, whatever `share` is (what an export stores)."""
        return ttq_ternarize(latent, self.wp, self.wn, self.factor(), self.rule, self.scale_grad,
                             self.threshold_per_channel)

    fixed = ternary  # the weight an export stores, as every grid quantizer names it

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return partial_ternarize(latent, self.ternary(latent), self.share)

    def extra_repr(self) -> str:
        per = ", per channel" if self.threshold_per_channel else ""
        return f"threshold={float(self.threshold_factor):.3g}{per}, rule={self.rule}, scale_grad={self.scale_grad}"


class LSQWeight(nn.Module):
    """LSQ integer weights: codes -Qn..Qp of `bits` bits times a learned step per output channel (`step`),
    initialised at 2·mean|w|/sqrt(Qp) (ternary.py: lsq_quantize)."""

    def __init__(self, latent: torch.Tensor, spec: QuantSpec):
        super().__init__()
        self.bits = int(spec.bits)
        self.step = nn.Parameter(lsq_initial_step(latent, self.bits))

    def fixed(self, latent: torch.Tensor) -> torch.Tensor:
        """The integer-grid weight (what an export stores)."""
        return lsq_quantize(latent, self.step.abs().clamp_min(1e-8), self.bits)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.fixed(latent)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-channel step"


class AbsmeanWeight(nn.Module):
    """BitNet b1.58: β = mean|W|, clip(round(W/β), -1, 1)·β, straight-through; nothing learned."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return absmean_ternarize(latent)


class FixedWeight(nn.Module):
    """The latent weight as it is (a ternary tensor read from a packed file)."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


def adopt_conv(module: nn.Conv2d, conv: nn.Conv2d) -> torch.Tensor:
    """Initialise a drop-in from the conv it replaces: nn.Module state, the conv's geometry, its weight as the FP32
    `latent_weight` parameter and its bias. (Not nn.Conv2d.__init__: `weight` is a property of drop-ins.)"""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d to replace, got {type(conv).__name__}")
    nn.Module.__init__(module)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                 "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
        setattr(module, name, getattr(conv, name))
    w = conv.weight.detach().clone().float()
    module.latent_weight = nn.Parameter(w)
    module.register_parameter("bias", nn.Parameter(conv.bias.detach().clone().float()) if conv.bias is not None else None)
    return w


# --------------------------------------------------------------------------------------------------------- layers
class QuantConv2d(nn.Conv2d):
    """Base of every quantized drop-in: `latent_weight`, `bias`, `spec` (QuantSpec) and `quantizer`, the injected
    weight quantizer; `weight` is `quantizer(latent_weight)`. Subclasses choose the quantizer (`make_quantizer`), the
    forward, and what assigning `weight` means (`absorb_weight`, called by Ultralytics' Conv+BN fusion)."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec):
        w = adopt_conv(self, conv)
        self.spec = spec
        self.quantizer = self.make_quantizer(w, spec)

    def make_quantizer(self, latent: torch.Tensor, spec: QuantSpec) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.quantizer(self.latent_weight)

    def __setattr__(self, name, value):
        if name == "weight" and "latent_weight" in self.__dict__.get("_parameters", {}):
            self.absorb_weight(value)
            return
        super().__setattr__(name, value)

    def absorb_weight(self, weight: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_parameters(self) -> list[nn.Parameter]:
        """The learned scales (Wp/Wn, Ap/An), which get their own optimizer group."""
        return [p for n, p in self.quantizer.named_parameters() if n != "threshold_factor"]

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The learned threshold factor t (spec.learn_threshold), which gets its own optimizer group."""
        return [p for n, p in self.quantizer.named_parameters() if n == "threshold_factor"]


class GridConv2d(QuantConv2d):
    """A plain conv on a weight from a fixed grid (ternary or integer codes times learned scales): the forward
    convolves with `weight`; assigning `weight` (Ultralytics' Conv+BN fusion) freezes the module into a plain
    nn.Conv2d holding it; to_plain_conv exports the stock conv holding the quantizer's grid weight."""

    def absorb_weight(self, weight: torch.Tensor) -> None:
        del self._parameters["latent_weight"]
        del self._modules["quantizer"]
        self.__dict__.pop("spec", None)
        self.__class__ = nn.Conv2d
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.conv2d(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), self.stride,
                        self.padding, self.dilation, self.groups)

    def to_plain_conv(self) -> nn.Conv2d:
        """A stock nn.Conv2d holding exactly the current grid weights (ternary: three values per layer)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.quantizer.fixed(self.latent_weight).detach())
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv.to(self.latent_weight.device)


class TTQConv2d(GridConv2d):
    """Trained Ternary Quantization conv: the forward convolves with the ternary shadow of `latent_weight`."""

    def make_quantizer(self, latent, spec):
        return TTQWeight(latent, spec)


class IntConv2d(GridConv2d):
    """LSQ integer-weight conv (spec.bits bits, a learned step per output channel), beside TTQ on the same base."""

    def make_quantizer(self, latent, spec):
        return LSQWeight(latent, spec)


class BitConv2d(QuantConv2d):
    """The BitLinear convolution (module docstring): `norm` (LayerNorm over the input channels), 8-bit absmax codes,
    conv with the quantized weight, rescale, bias. Buffer `out_scale`: per output channel, ones until a BatchNorm is
    folded in. Activation settings come from `spec` (act_bits, act_per_token, restore_token_stats)."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec):
        if isinstance(conv, nn.Conv2d) and (conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            raise SpecError("BitLinear layers support numeric zero padding only")
        super().__init__(conv, spec)
        w = self.latent_weight
        self.norm = nn.LayerNorm(self.in_channels).to(w.device)
        self.register_buffer("out_scale", torch.ones(self.out_channels, device=w.device))

    @torch.no_grad()
    def absorb_weight(self, folded: torch.Tensor) -> None:
        """Absorb an assigned weight that is a per-channel rescale of the current one (a BatchNorm fold) into
        `out_scale`; the ternary weight itself is unchanged."""
        current = self.weight.detach()  # what Ultralytics read and rescaled (out_scale is not part of it)
        s = channel_fold_scale(folded.to(current.dtype), current)
        self.out_scale.mul_(s.to(self.out_scale.dtype))

    def activation_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes, γ) of the quantised, normalised input."""
        codes, gamma, _, _ = quantize_tokens(x.float(), self.norm.weight, self.norm.bias, self.norm.eps,
                                             self.spec.act_bits, self.spec.act_per_token)
        return codes, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return bitlinear_conv2d(x, self.weight, self.bias, self.norm.weight, self.norm.bias, eps=self.norm.eps,
                                bits=s.act_bits, per_token=s.act_per_token, restore_token_stats=s.restore_token_stats,
                                out_scale=self.out_scale, stride=self.stride, padding=self.padding,
                                dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        s = self.spec
        return (super().extra_repr() + f", act_bits={s.act_bits}, per_token={s.act_per_token}, "
                f"restore_token_stats={s.restore_token_stats}")


class BitLinear_TTQ(BitConv2d):  # noqa: N801 - the name used by the project's plan and papers
    """BitLinear with TTQ weights {-An, 0, +Ap} (Ap/An learned: `quantizer.wp`, `quantizer.wn`)."""

    def make_quantizer(self, latent, spec):
        return TTQWeight(latent, spec)


class BitLinear_Standard(BitConv2d):  # noqa: N801 - pairs with BitLinear_TTQ
    """BitLinear with BitNet b1.58 absmean ternary weights {-β, 0, +β}; no learned scales (the ablation)."""

    def make_quantizer(self, latent, spec):
        return AbsmeanWeight()


class PackedBitLinear(BitConv2d):
    """A BitLinear rebuilt from a packed file: fixed ternary weight in `latent_weight`, BitLinear's activation path."""

    def make_quantizer(self, latent, spec):
        return FixedWeight()


LAYER_CLASSES = {"ttq": TTQConv2d, "bitlinear_ttq": BitLinear_TTQ, "bitlinear_standard": BitLinear_Standard,
                 "int": IntConv2d}


def quantized_layer(conv: nn.Conv2d, spec: QuantSpec) -> QuantConv2d:
    """The drop-in that `spec` asks for, initialised from `conv` and on its device."""
    return LAYER_CLASSES[spec.kind](conv, spec).to(conv.weight.device)
