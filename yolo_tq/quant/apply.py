"""The one module swap (`quantize_`), the filters that choose modules, stage installation and ternary export.

`quantize_(model, config, filter_fn)` has the shape of torchao's: every module for which `filter_fn(module, path)`
holds is replaced by what `config` builds from it. Configs: a QuantSpec (a quantized drop-in), TERNARY_EXPORT (a TTQ
layer becomes the plain conv holding its three values), or any type registered with `register_builder` (the packed
loader registers its own). Install, re-install from a checkpoint, export, C2PSA replacement and the packed loader all
go through it.

The selection rule (one for every model size): a stage names layer indices of the model's own yaml (`model.model[i]`);
inside each named layer every nn.Conv2d is chosen (1x1 kernels only when the stage includes them). The first conv of
the network, every C2PSA block and the Detect head are never chosen by this rule (found from module types). C2PSA has
its own filter (the convs inside its PSABlocks), for the BitLinear layers.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Iterable

import torch.nn as nn

from .layers import GridConv2d, QuantConv2d, quantized_layer
from .spec import QuantSpec

if TYPE_CHECKING:  # the plan lives a layer up (yolo_tq/plan.py); here it is only read
    from ..plan import StagePlan

FilterFn = Callable[[nn.Module, str], bool]
PSA_CONVS = ("attn.qkv", "attn.proj", "attn.pe", "ffn.0", "ffn.1")


class PlanError(ValueError):
    """A plan that does not fit the model (bad layer index, protected layer, mismatching checkpoint)."""


class TernaryExport:
    """quantize_ config: a grid conv (TTQConv2d, IntConv2d) becomes the stock nn.Conv2d holding its grid weight."""


TERNARY_EXPORT = TernaryExport()
_BUILDERS: dict[type, Callable[[nn.Module, object], nn.Module]] = {
    QuantSpec: lambda module, spec: quantized_layer(module, spec),
    TernaryExport: lambda module, _: module.to_plain_conv(),
}


def register_builder(config_type: type, build: Callable[[nn.Module, object], nn.Module]) -> None:
    """Teach quantize_ a new kind of config: `build(module, config)` returns the replacement module."""
    _BUILDERS[config_type] = build


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def quantize_(model: nn.Module, config, filter_fn: FilterFn) -> list[str]:
    """Replace, in place, every module of `model` that `filter_fn(module, path)` selects by what `config` builds
    from it. Returns the paths replaced, in module order."""
    build = _BUILDERS.get(type(config))
    if build is None:
        raise TypeError(f"quantize_ has no builder for {type(config).__name__}")
    targets = [(path, m) for path, m in model.named_modules() if path and filter_fn(m, path)]
    for path, module in targets:
        set_module(model, path, build(module, config))
    return [path for path, _ in targets]


# ------------------------------------------------------------------------------------------------------ filters
def is_quantized(module: nn.Module) -> bool:
    """A quantized drop-in of this package (TTQConv2d, the BitLinear layers)."""
    return isinstance(module, QuantConv2d)


def quantized_modules(model: nn.Module) -> dict[str, QuantConv2d]:
    """Module path -> quantized drop-in, for every one installed in `model`."""
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned scales (Wp/Wn of TTQ layers, Ap/An of BitLinear_TTQ)."""
    return [p for m in quantized_modules(model).values() for p in m.scale_parameters()]


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned threshold factors (TTQ layers whose spec has learn_threshold)."""
    return [p for m in quantized_modules(model).values() for p in m.threshold_parameters()]


def paths_filter(paths: Iterable[str], skip_quantized: bool = True) -> FilterFn:
    """Selects the modules at `paths` (those already quantized are left alone unless skip_quantized=False)."""
    chosen = set(paths)
    return lambda m, path: path in chosen and not (skip_quantized and is_quantized(m))


def _layers(model: nn.Module) -> nn.Sequential:
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Sequential):
        raise PlanError("expected an Ultralytics model with a `.model` layer sequence (DetectionModel)")
    return inner


def _prefix(model: nn.Module) -> str:
    seq = _layers(model)
    return next((f"{name}." if name else "" for name, m in model.named_modules() if m is seq), "model.")


def protected_layers(model: nn.Module) -> dict[int, str]:
    """Layer indices the stage rule never touches, with the reason: first conv, C2PSA blocks, the Detect head."""
    from ultralytics.nn.modules.block import C2PSA
    from ultralytics.nn.modules.head import Detect

    layers = _layers(model)
    out: dict[int, str] = {}
    first = next((i for i, layer in enumerate(layers) if any(isinstance(m, nn.Conv2d) for m in layer.modules())), None)
    if first is not None:
        out[first] = "the first conv of the network"
    for i, layer in enumerate(layers):
        if any(isinstance(m, C2PSA) for m in layer.modules()):
            out[i] = "a C2PSA block (use the BitLinear stages for it)"
        if isinstance(layer, Detect):
            out[i] = "the Detect head"
    out.setdefault(len(layers) - 1, "the Detect head")
    return out


def select_convs(model: nn.Module, layers, include_1x1: bool, detect_head: bool = False) -> dict[str, nn.Conv2d]:
    """Module path -> conv for every conv the stage rule selects in the given layer indices.

    `detect_head` (the wide plan, beyond the original rule) also selects the Detect head's inner convs, those inside
    Conv/DWConv blocks; the head's last convs (which produce box and class outputs) and the DFL stay FP."""
    seq, protected, prefix = _layers(model), protected_layers(model), _prefix(model)
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
            parent = seq[idx].get_submodule(name.rpartition(".")[0]) if "." in name else seq[idx]
            if head and not hasattr(parent, "bn"):  # a bare output conv or the DFL
                continue
            chosen[f"{prefix}{idx}.{name}"] = m
    return chosen


def c2psa_convs(model: nn.Module, first_block_only: bool = False) -> dict[str, nn.Conv2d]:
    """Path -> conv (plain or already quantized) for the five convs of every PSABlock inside every C2PSA (with
    `first_block_only`, of its first PSABlock only, as the original code chose)."""
    from ultralytics.nn.modules.block import C2PSA, PSABlock

    out = {}
    for name, c2psa in model.named_modules():
        if not isinstance(c2psa, C2PSA):
            continue
        blocks = [(s, b) for s, b in c2psa.named_modules() if isinstance(b, PSABlock)]
        for sub, block in blocks[:1] if first_block_only else blocks:
            for conv_path in PSA_CONVS:
                conv = getattr(block.get_submodule(conv_path), "conv", None) if _has_submodule(block, conv_path) \
                    else None
                if not isinstance(conv, nn.Conv2d):
                    raise PlanError(f"{name}.{sub}.{conv_path} has no conv: not the Ultralytics PSABlock layout")
                out[".".join(p for p in (name, sub, conv_path, "conv") if p)] = conv
    return out


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def layer_indices(model: nn.Module, paths) -> set[int]:
    """The layer indices (model.model[i]) of module paths."""
    prefix = _prefix(model)
    heads = (path[len(prefix):].split(".", 1)[0] for path in paths if path.startswith(prefix))
    return {int(h) for h in heads if h.isdigit()}


def layers_holding_quantized(model: nn.Module) -> set[int]:
    """Layer indices (model.model[i]) that hold at least one quantized module."""
    return layer_indices(model, quantized_modules(model))


# ------------------------------------------------------------------------------------------------- stages
def stage_targets(model: nn.Module, plan: "StagePlan") -> list[tuple[QuantSpec, list[str]]]:
    """The selection rule applied to one stage: (spec, paths) for its selected convs (plan.spec) and, with a C2PSA
    step, for the convs inside C2PSA (plan.c2psa)."""
    targets = [(plan.spec, list(select_convs(model, plan.layers, plan.include_1x1, plan.detect_head)))]
    if plan.c2psa is not None:
        paths = list(c2psa_convs(model, plan.c2psa_blocks == "first"))
        if not paths:
            raise PlanError(f"{type(model).__name__} has no C2PSA block to replace")
        targets.append((plan.c2psa, paths))
    return targets


def stage_paths(model: nn.Module, plan: "StagePlan") -> list[str]:
    """The paths of the convs a stage quantizes (stage_targets)."""
    return [path for _, paths in stage_targets(model, plan) for path in paths]


def install_stage(model: nn.Module, plan: "StagePlan", targets=None) -> list[str]:
    """Install what one stage adds, at `targets` (stage_targets, computed here when not given); layers already
    quantized keep their latent weights and scales. Returns the paths installed now."""
    targets = stage_targets(model, plan) if targets is None else targets
    return [path for spec, paths in targets for path in quantize_(model, spec, paths_filter(paths))]


def install_like(model: nn.Module, source: nn.Module) -> list[str]:
    """Install, at the same paths and with the same specs, every quantized module that `source` holds (before
    loading a quantized checkpoint's state dict into a freshly built model)."""
    by_spec: dict[QuantSpec, list[str]] = {}
    for path, q in quantized_modules(source).items():
        try:
            target = model.get_submodule(path)
        except AttributeError as e:
            raise PlanError(f"checkpoint has a quantized module at '{path}' that this model lacks") from e
        if not isinstance(target, nn.Conv2d):
            raise PlanError(f"'{path}' is {type(target).__name__} here, not a conv")
        by_spec.setdefault(q.spec, []).append(path)
    done = []
    for spec, paths in by_spec.items():
        done += quantize_(model, spec, paths_filter(paths))
    return done


def export_ternary(model: nn.Module) -> nn.Module:
    """A deep copy in which every TTQConv2d is a plain nn.Conv2d holding its three values (BitLinear layers stay:
    they are not plain convs). The model itself is never changed."""
    out = copy.deepcopy(model)
    quantize_(out, TERNARY_EXPORT, lambda m, _: isinstance(m, GridConv2d))
    return out


def ternarize_(model: nn.Module, plans: Iterable["StagePlan"]) -> list[str]:
    """Post-training ternarisation: install every plan's layers in order (Wp/Wn from the weights, as TTQ training
    starts). The one post-training path; BatchNorm re-estimation, when wanted, follows (train.batchnorm)."""
    return [path for plan in plans for path in install_stage(model, plan)]
