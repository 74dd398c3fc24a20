"""Which convolutions a stage plan ternarises, and installing / exporting the quantized drop-ins.

One selection rule for every model size: a plan names layer indices of the model's own yaml (`model.model[i]`);
inside each named layer every nn.Conv2d is chosen (1x1 kernels only when the plan includes them). The first conv of
the network, every C2PSA block and the Detect head are never chosen by this rule; they are found from the model
(module types), not from numbers that only hold for yolo11n. C2PSA has its own replacement (BitLinear modules).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .ttq_conv import TTQConv2d


class PlanError(ValueError):
    """A plan that does not fit the model (bad layer index, protected layer, mismatching checkpoint)."""


@dataclass(frozen=True)
class LayerPlan:
    """The layers one stage adds, and how they are ternarised."""

    layers: tuple[int, ...]
    include_1x1: bool = False
    threshold: float = 0.7
    rule: str = "mean"
    scale_grad: str = "paper"
    per_channel: bool = False
    detect_head: bool = False


def is_quantized(module: nn.Module) -> bool:
    """A quantized drop-in of this package (TTQConv2d, BitLinear_TTQ, standard BitLinear)."""
    return isinstance(module, TTQConv2d) or (hasattr(module, "settings") and hasattr(module, "scale_parameters"))


def _layers(model: nn.Module) -> nn.Sequential:
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Sequential):
        raise PlanError("expected an Ultralytics model with a `.model` layer sequence (DetectionModel)")
    return inner


def protected_layers(model: nn.Module) -> dict[int, str]:
    """Layer indices the TTQ rule never touches, with the reason: first conv, C2PSA blocks, the Detect head."""
    layers = _layers(model)
    out: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if any(isinstance(m, nn.Conv2d) for m in layer.modules()):
            out[i] = "the first conv of the network"
            break
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if name == "C2PSA" or any(type(m).__name__ == "C2PSA" for m in layer.modules()):
            out[i] = "a C2PSA block (use the BitLinear stages for it)"
        if hasattr(layer, "stride") and hasattr(layer, "nl") and hasattr(layer, "reg_max"):
            out[i] = "the Detect head"
    out[len(layers) - 1] = out.get(len(layers) - 1, "the Detect head")
    return out


def select_convs(model: nn.Module, layers, include_1x1: bool, detect_head: bool = False) -> dict[str, nn.Conv2d]:
    """Module path -> conv for every conv the rule selects in the given layer indices.

    `detect_head` (the wide plan, beyond the original rule) also selects the Detect head's inner convs, those inside
    Conv/DWConv blocks; the head's last convs (which produce box and class outputs) and the DFL stay FP."""
    seq = _layers(model)
    protected = protected_layers(model)
    prefix = _prefix(model, seq)
    chosen: dict[str, nn.Conv2d] = {}
    for idx in layers:
        if not isinstance(idx, int) or not 0 <= idx < len(seq):
            raise PlanError(f"layer {idx} does not exist: this model has layers 0..{len(seq) - 1}")
        head = detect_head and protected.get(idx) == "the Detect head"
        if idx in protected and not head:
            raise PlanError(f"layer {idx} ({type(seq[idx]).__name__}) is {protected[idx]} and is never ternarised")
        for name, m in seq[idx].named_modules():
            if not isinstance(m, nn.Conv2d) or (not include_1x1 and tuple(m.kernel_size) == (1, 1)):
                continue
            if head:
                parent = seq[idx].get_submodule(name.rpartition(".")[0]) if "." in name else seq[idx]
                if not hasattr(parent, "bn"):  # a bare output conv or the DFL
                    continue
            chosen[f"{prefix}{idx}.{name}"] = m
    return chosen


def _prefix(model: nn.Module, seq: nn.Sequential) -> str:
    for name, m in model.named_modules():
        if m is seq:
            return f"{name}." if name else ""
    return "model."


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> quantized drop-in, for every one installed in `model`."""
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned scales (Wp/Wn of TTQ layers, Ap/An of BitLinear_TTQ) that get their own optimizer group."""
    params = []
    for m in quantized_modules(model).values():
        params.extend(m.scale_parameters() if hasattr(m, "scale_parameters") else (m.wp, m.wn))
    return params


class ShadowWeightManager:
    """Installs TTQ on the convs a plan selects; exposes the scales; exports the stock ternary model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def select(self, plan: LayerPlan) -> dict[str, nn.Conv2d]:
        return select_convs(self.model, plan.layers, plan.include_1x1, plan.detect_head)

    def install(self, plan: LayerPlan) -> list[str]:
        """Swap the selected convs for TTQConv2d (initialised from their current weights). Convs that are already
        quantized stay as they are (latent weights and scales kept). Returns the paths newly installed."""
        added = []
        for path, conv in self.select(plan).items():
            if is_quantized(conv):
                continue
            q = TTQConv2d(conv, plan.threshold, plan.rule, plan.scale_grad, plan.per_channel)
            _set_module(self.model, path, q.to(conv.weight.device))
            added.append(path)
        return added

    def replicate_from(self, source: nn.Module) -> list[str]:
        """Install, at the same paths and with the same settings, every quantized module that `source` holds.
        Used before loading a quantized checkpoint's state dict into a freshly built model."""
        done = []
        for path, q in quantized_modules(source).items():
            try:
                target = self.model.get_submodule(path)
            except AttributeError as e:
                raise PlanError(f"checkpoint has a quantized module at '{path}' that this model lacks") from e
            if is_quantized(target):
                continue
            if not isinstance(target, nn.Conv2d):
                raise PlanError(f"'{path}' is {type(target).__name__} here, not a conv")
            _set_module(self.model, path, type(q).from_conv(target, **q.settings()) if hasattr(type(q), "from_conv")
                        else type(q)(target, **q.settings()))
            done.append(path)
        return done

    @property
    def quantized(self) -> dict[str, nn.Module]:
        return quantized_modules(self.model)

    def scale_parameters(self) -> list[nn.Parameter]:
        return scale_parameters(self.model)

    def scales(self) -> dict[str, tuple[float, float]]:
        """Path -> (Wp, Wn) as floats (means over channels for per-channel scales)."""
        return {p: (float(m.wp.detach().mean()), float(m.wn.detach().mean()))
                for p, m in self.quantized.items() if isinstance(m, TTQConv2d)}

    def export_ternary(self) -> nn.Module:
        """A deep copy in which every TTQConv2d is a plain nn.Conv2d holding its three values; other quantized
        modules (BitLinear) are exported by their own `export()` if they have one, else kept."""
        model = copy.deepcopy(self.model)
        for path, q in quantized_modules(model).items():
            if hasattr(q, "to_plain_conv"):
                _set_module(model, path, q.to_plain_conv())
            elif hasattr(q, "export"):
                _set_module(model, path, q.export())
        return model


def plan_layers_in(model: nn.Module) -> set[int]:
    """Layer indices that hold at least one quantized module."""
    seq = _layers(model)
    prefix = _prefix(model, seq)
    out = set()
    for path in quantized_modules(model):
        rest = path[len(prefix):] if path.startswith(prefix) else path
        head = rest.split(".", 1)[0]
        if head.isdigit():
            out.add(int(head))
    return out


@torch.no_grad()
def ternary_values(weight: torch.Tensor, max_distinct: int = 3) -> torch.Tensor | None:
    """The sorted distinct values of `weight` if it is ternary ({-a, 0, +b} with a, b >= 0, at most 3 values,
    zero allowed to be absent), else None. Judged from the weights alone."""
    vals = torch.unique(weight.detach().float())
    if vals.numel() > max_distinct:
        return None
    if (vals > 0).sum() > 1 or (vals < 0).sum() > 1:
        return None
    return vals
