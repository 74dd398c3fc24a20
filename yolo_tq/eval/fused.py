"""What the Conv+BN-fused model's weights (what exports contain) allow a backend to exploit: per-channel ternary
structure, and how exactly per-channel symmetric INT8 (NNCF's and TensorRT's for conv weights) represents them."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn


@contextlib.contextmanager
def single_thread():
    """Many tiny tensor ops on one thread: on a busy machine the intra-op pool's hand-offs cost more than the ops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def channelwise_ternary(weight: torch.Tensor) -> bool:
    """True if every output channel holds at most {-a_c, 0, +b_c}: a ternary conv stays so after Conv+BN fusion."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    hi = w.amax(dim=1, keepdim=True).clamp_min(0)  # +b_c (0 if the channel has no positive value)
    lo = w.amin(dim=1, keepdim=True).clamp_max(0)  # -a_c
    return bool(((w == 0) | (w == hi) | (w == lo)).all())


@torch.no_grad()
def int8_rounding_error(weight: torch.Tensor) -> float:
    """Largest |w - dequant(quant(w))| of per-output-channel symmetric INT8 relative to the channel's max|w_c|: at
    most 0.5/127, 0 for a ternary channel with a_c = b_c."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    err = (w - torch.clamp(torch.round(w / scale), -127, 127) * scale).abs().amax(dim=1, keepdim=True)
    rel = torch.where(amax > 0, err / amax, torch.zeros_like(err))
    return float(rel.max())


@torch.no_grad()
def fused(model: nn.Module) -> nn.Module:
    """An FP32 copy of the model, Conv+BN fused (what exports contain)."""
    m = copy.deepcopy(model).float().eval()
    return m.fuse(verbose=False) if hasattr(m, "fuse") else m


@torch.no_grad()
def fused_state(model: nn.Module) -> dict:
    """The fused model's float tensors as numpy arrays, as the ONNX export holds them."""
    return {k: v.detach().cpu().numpy() for k, v in fused(model).state_dict().items() if v.is_floating_point()}


def fused_weight_error(onnx_model, names: list[str], model: nn.Module) -> tuple[float, int]:
    """(largest relative difference, tensors compared) between an ONNX export's tensors `names` and the fused
    model's tensors of the same name and shape."""
    from onnx import numpy_helper

    from ..formats.deploy_onnx import rel_error

    state, inits = fused_state(model), {t.name: t for t in onnx_model.graph.initializer}
    worst, n = 0.0, 0
    for name in names:
        if name in state and name in inits:
            a = numpy_helper.to_array(inits[name])
            if a.shape == state[name].shape:
                worst, n = max(worst, rel_error(a, state[name])), n + 1
    return worst, n


@torch.no_grad()
def deploy_weight_summary(model: nn.Module) -> dict:
    """Over the fused model: convs, per-channel ternary convs and their share of conv parameters, and the INT8
    rounding error of ternary vs other convs."""
    convs = [(m.weight, channelwise_ternary(m.weight)) for m in fused(model).modules() if isinstance(m, nn.Conv2d)]
    err_t, err_fp = ([int8_rounding_error(w) for w, tern in convs if tern == t] for t in (True, False))
    params, tern_params = sum(w.numel() for w, _ in convs), sum(w.numel() for w, tern in convs if tern)
    med = lambda xs: float(torch.tensor(xs).median()) if xs else None  # noqa: E731
    return {"fused_convs": len(convs), "ternary_convs": len(err_t), "conv_params": params,
            "ternary_conv_params": tern_params, "ternary_param_share": tern_params / params if params else 0.0,
            "int8_rel_error_ternary_max": max(err_t) if err_t else None,
            "int8_rel_error_ternary_median": med(err_t), "int8_rel_error_fp_median": med(err_fp)}
