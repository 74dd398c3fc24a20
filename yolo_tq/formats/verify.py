"""The round-trip check of a packed file: an unpacked model against the model it was packed from, entry by entry."""

from __future__ import annotations

import torch
import torch.nn as nn

from .codes import GRID_MAX_REL_ERROR, bn_affine, quantize_int8_per_channel
from .layout import entry_kinds

class _TensorView:
    """name -> tensor of a model: its state dict, else a module attribute (a BitLinear's computed `weight`)."""

    def __init__(self, model: nn.Module):
        self.model, self.state = model, model.state_dict()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.state:
            return self.state[name]
        path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(path), attr).detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)) if a.numel() else 0.0


def _int8_err_steps(src: torch.Tensor, out: torch.Tensor) -> float:
    """Worst error of an INT8 tensor, in quantization steps of its output channel."""
    _, scale = quantize_int8_per_channel(src, torch.float32)
    err = (src.float() - out.float()).reshape(scale.numel(), -1).abs().amax(1)
    return float((err / scale.clamp_min(1e-30)).max()) if err.numel() else 0.0


def _bn_rel_err(a: nn.Module, b: nn.Module) -> float:
    sa, ta = bn_affine(a.weight, a.bias, a.running_mean, a.running_var, a.eps)
    sb, tb = bn_affine(b.weight, b.bias, b.running_mean, b.running_var, b.eps)
    return max(_rel(sb, sa), _rel(tb, ta))


@torch.no_grad()
def verify_round_trip(source: nn.Module, unpacked: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    """Compare an unpacked model with the model it was packed from, entry by entry of the file's `tensors`:
    ternary tensors must be equal, integer-grid ones equal up to float (FP16 storage) rounding (GRID_MAX_REL_ERROR), INT8 ones within half a quantization step (per output channel), FP16 ones
    within FP16 rounding; each BatchNorm is compared as the affine map it computes in eval mode."""
    src, out = _TensorView(source), _TensorView(unpacked)
    rep = {"ternary": 0, "ternary_identical": 0, "grid": 0, "grid_identical": 0, "grid_max_rel_err": 0.0, "int8": 0, "int8_max_err_steps": 0.0, "fp16": 0,
           "fp16_max_rel_err": 0.0, "bn": 0, "bn_max_rel_err": 0.0}
    for name, kind in entry_kinds(tensors).items():
        kind = "grid" if kind.startswith("grid") else kind
        if kind in ("ternary", "grid"):
            rep[f"{kind}_identical"] += int(torch.equal(src[name].float(), out[name].float()))
        if kind == "grid":
            rep["grid_max_rel_err"] = max(rep["grid_max_rel_err"], _rel(out[name], src[name]))
        elif kind == "int8":
            rep["int8_max_err_steps"] = max(rep["int8_max_err_steps"], _int8_err_steps(src[name], out[name]))
        elif kind == "fp16":
            rep["fp16_max_rel_err"] = max(rep["fp16_max_rel_err"], _rel(out[name], src[name]))
        elif kind == "bn":
            rep["bn_max_rel_err"] = max(rep["bn_max_rel_err"], _bn_rel_err(source.get_submodule(name),
                                                                           unpacked.get_submodule(name)))
        if kind in rep:
            rep[kind] += 1
    rep["ok"] = rep["ternary_identical"] == rep["ternary"] and rep["grid_max_rel_err"] <= GRID_MAX_REL_ERROR and rep["int8_max_err_steps"] <= 0.5 + 1e-3
    return rep
