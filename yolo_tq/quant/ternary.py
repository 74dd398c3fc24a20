"""Pure quantization math: thresholds, TTQ ternarisation, BitNet absmean weights, absmax activations.

Nothing here knows about models, files or Ultralytics. Every function works on tensors only.

TTQ (Zhu et al. 2016, arXiv:1612.01064): a latent weight w is mapped to
    w_t = +Wp  where w >  Δ
    w_t =  0   where |w| <= Δ
    w_t = -Wn  where w < -Δ
with learned positive scales Wp, Wn. Gradients (paper, eq. 7-8), with g = dL/dw_t:
    dL/dWp =  Σ_{w>Δ} g        dL/dWn = -Σ_{w<-Δ} g
    dL/dw  = Wp·g on {w>Δ},  g on {|w|<=Δ},  Wn·g on {w<-Δ}
A learned threshold (beyond the paper) gets dL/dΔ from a window estimate (threshold_grad), since the step functions'
derivative in Δ is zero almost everywhere.
Wp/Wn may be scalars (one per layer, as in the paper) or per-output-channel tensors of shape (C_out, 1, 1, 1).

LSQ (Esser et al. 2019, arXiv:1902.08153), the integer weights beside TTQ: a b-bit signed grid with codes in
[-Qn, Qp] = [-2^(b-1), 2^(b-1) - 1] and a learned step s (here one per output channel),
    v̂ = round(clip(v/s, -Qn, Qp))·s
with the straight-through gradient for v (1 where -Qn < v/s < Qp, else 0) and, for s (paper, eq. 3),
    dv̂/ds = -v/s + round(v/s)  where -Qn < v/s < Qp;   -Qn where v/s <= -Qn;   Qp where v/s >= Qp
scaled by g = 1/sqrt(N·Qp), N the number of weights that share the step. s starts at 2·mean|v|/sqrt(Qp).
"""

from __future__ import annotations

import math

import torch

THRESHOLD_RULES = ("mean", "max")
SCALE_GRAD_MODES = ("paper", "normalized")
THRESHOLD_GRAD_WINDOW = 0.1  # half-width of threshold_grad's window, as a share of Δ


def ternary_threshold(weight: torch.Tensor, factor: float, rule: str = "mean", per_channel: bool = False
                      ) -> torch.Tensor:
    """Δ = factor · mean|w| (rule 'mean') or factor · max|w| (rule 'max', the paper's), over the whole layer (a
    scalar) or, with per_channel, over each output channel (shape (C_out, 1, ..., 1)). No gradient flows from Δ to
    w; a learned factor (a Parameter) gets one."""
    w = weight.detach().abs()
    dims = tuple(range(1, w.dim()))
    if rule == "mean":
        return factor * (w.mean(dim=dims, keepdim=True) if per_channel else w.mean())
    if rule == "max":
        return factor * (w.amax(dim=dims, keepdim=True) if per_channel else w.max())
    raise ValueError(f"unknown threshold rule {rule!r}; valid rules: {', '.join(THRESHOLD_RULES)}")


def ternary_masks(weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the positive set {w > Δ} and the negative set {w < -Δ}."""
    return weight > delta, weight < -delta


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `t` down to `shape` (a scalar-like shape sums everything; (C,1,1,1) sums per output channel)."""
    if len(shape) == 0 or all(s == 1 for s in shape):
        return t.sum().reshape(shape)
    dims = tuple(d for d, s in enumerate(shape) if s == 1)
    return t.sum(dim=dims, keepdim=True)


def initial_scales(weight: torch.Tensor, delta: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Wp, Wn initialised as mean|w| over the positive and negative sets (falls back to Δ for an empty set)."""
    w = weight.detach()
    pos, neg = ternary_masks(w, delta)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel else ()
    pos_sum, pos_n = _sum_to(w * pos, torch.Size(shape)), _sum_to(pos.to(w.dtype), torch.Size(shape))
    neg_sum, neg_n = _sum_to(-w * neg, torch.Size(shape)), _sum_to(neg.to(w.dtype), torch.Size(shape))
    fallback = torch.as_tensor(delta, dtype=w.dtype, device=w.device).clamp_min(1e-8)
    if not per_channel:  # one scale per layer: a per-channel Δ falls back to its mean
        fallback = fallback.mean()
    wp = torch.where(pos_n > 0, pos_sum / pos_n.clamp_min(1), fallback)
    wn = torch.where(neg_n > 0, neg_sum / neg_n.clamp_min(1), fallback)
    return wp, wn


def ttq_scale_grads(
    grad: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, mode: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of Wp and Wn. 'paper': sums over the sets. 'normalized': means over the sets, divided by the
    current scale and clipped to [-1, 1] (keeps the scale step independent of layer size and scale magnitude)."""
    gp = _sum_to(grad * pos, wp.shape)
    gn = -_sum_to(grad * neg, wn.shape)
    if mode == "paper":
        return gp, gn
    if mode == "normalized":
        np_ = _sum_to(pos.to(grad.dtype), wp.shape).clamp_min(1)
        nn_ = _sum_to(neg.to(grad.dtype), wn.shape).clamp_min(1)
        return (gp / np_ / wp.detach().abs().clamp_min(1e-8)).clamp(-1, 1), (
            gn / nn_ / wn.detach().abs().clamp_min(1e-8)
        ).clamp(-1, 1)
    raise ValueError(f"unknown scale-gradient mode {mode!r}; valid modes: {', '.join(SCALE_GRAD_MODES)}")


def threshold_grad(grad: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor,
                   window: float = THRESHOLD_GRAD_WINDOW) -> torch.Tensor:
    """dL/dΔ as the central difference, over ±h (h = window·Δ), of the loss linearised in w_t:
    raising Δ by h turns the weights in (Δ, Δ+h] from +Wp to 0 and those in [−Δ−h, −Δ) from −Wn to 0, so
        dL/dΔ ≈ (−Wp·Σ_{|w−Δ|<h} g + Wn·Σ_{|w+Δ|<h} g) / (2h),
    summed over the layer for a scalar Δ, per output channel for a per-channel Δ (shape of `delta`)."""
    delta = delta.detach()
    h = (window * delta).clamp_min(1e-12)
    near_pos = (weight - delta).abs() < h
    near_neg = (weight + delta).abs() < h
    return _sum_to(-wp * grad * near_pos + wn * grad * near_neg, delta.shape) / (2 * h)


class TTQTernarize(torch.autograd.Function):
    """w_t = Wp·[w>Δ] − Wn·[w<−Δ], with the paper's backward (see module docstring); a Δ that requires a gradient
    (learned threshold) gets threshold_grad's."""

    @staticmethod
    def forward(ctx, weight, wp, wn, delta, mode="paper"):
        pos, neg = ternary_masks(weight, delta)
        ctx.save_for_backward(pos, neg, wp, wn, weight if ctx.needs_input_grad[3] else None, delta)
        ctx.mode = mode
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx, grad):
        pos, neg, wp, wn, weight, delta = ctx.saved_tensors
        grad_w = grad * torch.where(pos, wp, torch.where(neg, wn, torch.ones_like(wp)))
        grad_wp, grad_wn = ttq_scale_grads(grad, pos, neg, wp, wn, ctx.mode)
        grad_delta = None
        if ctx.needs_input_grad[3]:
            grad_delta = threshold_grad(grad, weight, delta, wp.detach(), wn.detach()).reshape(delta.shape)
        return grad_w, grad_wp, grad_wn, grad_delta, None


def ttq_ternarize(
    weight: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, factor: float | torch.Tensor, rule: str = "mean",
    mode: str = "paper", per_channel_threshold: bool = False,
) -> torch.Tensor:
    """Ternary shadow of `weight` with learned scales (what TTQWeight computes): threshold Δ from the latent weight
    (a tensor `factor` that requires a gradient is learned), then TTQTernarize."""
    delta = ternary_threshold(weight, factor, rule, per_channel_threshold)
    return TTQTernarize.apply(weight, wp, wn, delta, mode)


def lsq_levels(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of LSQ's signed b-bit grid: codes -Qn..Qp."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"integer weights take 2 to 8 bits, got {bits}")
    return 2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1


def lsq_initial_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ's initial step per output channel, 2·mean|v|/sqrt(Qp), shape (C_out, 1, ..., 1) (a tiny positive step
    for an all-zero channel)."""
    _, qp = lsq_levels(bits)
    w = weight.detach().abs()
    mean = w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return (2 * mean / math.sqrt(qp)).clamp_min(1e-8)


def lsq_grad_scale(weights_per_step: int, bits: int) -> float:
    """LSQ's step-gradient scale g = 1/sqrt(N·Qp)."""
    return 1.0 / math.sqrt(max(int(weights_per_step), 1) * lsq_levels(bits)[1])


class LSQQuantize(torch.autograd.Function):
    """v̂ = clamp(round(v/s), -Qn, Qp)·s (for integer bounds the same as round(clip(v/s))), with LSQ's backward
    (module docstring); s broadcasts against v (a scalar or one step per output channel)."""

    @staticmethod
    def forward(ctx, weight, step, qn, qp, grad_scale):
        x = weight / step
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return torch.clamp(torch.round(x), -qn, qp) * step

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        low, high = x <= -ctx.qn, x >= ctx.qp
        d_step = torch.where(low, torch.full_like(x, -ctx.qn),
                             torch.where(high, torch.full_like(x, ctx.qp), torch.round(x) - x))
        grad_w = grad * ~(low | high)
        grad_s = _sum_to(grad * d_step, step.shape) * ctx.grad_scale
        return grad_w, grad_s, None, None, None


def lsq_quantize(weight: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The b-bit LSQ shadow of `weight` with step `step` (per output channel: g counts the weights of a channel)."""
    qn, qp = lsq_levels(bits)
    per_step = weight.numel() // max(step.numel(), 1)
    return LSQQuantize.apply(weight, step, qn, qp, lsq_grad_scale(per_step, bits))


def magnitude_mask(weight: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean mask of the `share` (0..1) of the entries of `weight` with the largest magnitudes (at least one entry
    when share > 0; ties at the cut-off are all taken). Incremental ternarisation quantizes these first (INQ)."""
    a = weight.detach().abs().reshape(-1)
    k = min(a.numel(), max(1, math.ceil(share * a.numel())))
    cutoff = torch.kthvalue(a, a.numel() - k + 1).values
    return weight.detach().abs() >= cutoff


def partial_ternarize(latent: torch.Tensor, ternary: torch.Tensor, share: float) -> torch.Tensor:
    """The ternary values on the `share` of largest-magnitude weights, the latent (full-precision) ones elsewhere;
    gradients flow to each part through its own path. share >= 1: `ternary` itself; share <= 0: `latent` itself."""
    if share >= 1:
        return ternary
    if share <= 0:
        return latent
    return torch.where(magnitude_mask(latent, share), ternary, latent)


def absmean_ternarize(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet b1.58 weights: β = mean|W|, W_q = clip(round(W/β), −1, 1)·β; straight-through to the latent W.

    β is computed from the current weight and is not learned (no gradient through β)."""
    beta = weight.detach().abs().mean().clamp_min(eps)
    q = (weight.detach() / beta).round().clamp(-1, 1) * beta
    return q + (weight - weight.detach())  # values exactly q (w + (q − w) is off by an ulp), gradient to w


def absmax_scale(x: torch.Tensor, per_token: bool = True, dim: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """γ = max|x| per token (over `dim`, kept for broadcasting) or over the whole tensor; never below eps."""
    a = x.detach().abs()
    g = a.amax(dim=dim, keepdim=True) if per_token else a.amax()
    return g.clamp_min(eps)


def absmax_quantize(x: torch.Tensor, bits: int = 8, per_token: bool = True, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes x_q = clip(round(x·Q/γ), −Q−1, Q) with Q = 2^(bits−1)−1, and γ. Straight-through estimator
    for round and clip together: with γ = max|x| the clip never cuts, and the max element itself (which lands on
    the clip boundary) keeps its gradient."""
    q = 2 ** (bits - 1) - 1
    gamma = absmax_scale(x, per_token, dim)
    scaled = x * (q / gamma)
    codes = scaled + (torch.round(scaled).clamp(-q - 1, q) - scaled).detach()
    return codes, gamma


@torch.no_grad()
def ternary_values(weight: torch.Tensor, max_distinct: int = 3) -> torch.Tensor | None:
    """The sorted distinct values of `weight` if it is ternary ({-a, 0, +b} with a, b >= 0, at most 3 values, zero
    allowed to be absent), else None. The one rule that judges a tensor ternary from its values alone."""
    vals = torch.unique(weight.detach().float())
    if vals.numel() > max_distinct:
        return None
    if (vals > 0).sum() > 1 or (vals < 0).sum() > 1:
        return None
    return vals
