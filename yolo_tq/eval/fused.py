"""What a model's weights allow a deployment backend to exploit: per-channel ternary structure and how exactly
per-channel symmetric INT8 (what NNCF and TensorRT use for conv weights) represents them."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn


@contextlib.contextmanager
def single_thread():
    """Run many tiny tensor ops on one thread: on a busy machine the intra-op pool's hand-offs cost more than the
    ops themselves (measured: 2.2 s vs 0.3 s for a yolo11n layer report with the other core busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def channelwise_ternary(weight: torch.Tensor) -> bool:
    """True if every output channel holds at most the values {-a_c, 0, +b_c} (a_c, b_c >= 0). A ternary conv stays
    so after Conv+BN fusion, which scales each output channel by one number."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    hi = w.amax(dim=1, keepdim=True).clamp_min(0)  # +b_c (0 if the channel has no positive value)
    lo = w.amin(dim=1, keepdim=True).clamp_max(0)  # -a_c
    return bool(((w == 0) | (w == hi) | (w == lo)).all())


@torch.no_grad()
def int8_rounding_error(weight: torch.Tensor) -> float:
    """Largest |w - dequant(quant(w))| of per-output-channel symmetric INT8 (scale = max|w_c| / 127), relative to
    that channel's max|w_c|. At most 0.5/127 ≈ 0.0039 for any weight; 0 for a ternary channel with a_c = b_c; for
    TTQ's asymmetric {-Wn, 0, +Wp} the smaller magnitude is rounded to the nearest of 127 steps."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    err = (w - torch.clamp(torch.round(w / scale), -127, 127) * scale).abs().amax(dim=1, keepdim=True)
    rel = torch.where(amax > 0, err / amax, torch.zeros_like(err))
    return float(rel.max())


@torch.no_grad()
def deploy_weight_summary(model: nn.Module) -> dict:
    """Counts over the Conv+BN-fused model (what exports contain): convs, per-channel ternary convs and their share
    of conv parameters, and the INT8 rounding error of ternary vs other convs."""
    fused = copy.deepcopy(model).float().eval()
    if hasattr(fused, "fuse"):
        fused = fused.fuse(verbose=False)
    n = tern = params = tern_params = 0
    err_t, err_fp = [], []
    for m in fused.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        w = m.weight
        n += 1
        params += w.numel()
        if channelwise_ternary(w):
            tern += 1
            tern_params += w.numel()
            err_t.append(int8_rounding_error(w))
        else:
            err_fp.append(int8_rounding_error(w))
    med = lambda xs: float(torch.tensor(xs).median()) if xs else None  # noqa: E731
    return {"fused_convs": n, "ternary_convs": tern, "conv_params": params, "ternary_conv_params": tern_params,
            "ternary_param_share": tern_params / params if params else 0.0,
            "int8_rel_error_ternary_max": max(err_t) if err_t else None,
            "int8_rel_error_ternary_median": med(err_t), "int8_rel_error_fp_median": med(err_fp)}
