"""Replacing the convolutions inside every C2PSA block with BitLinear layers.

In each PSABlock of each C2PSA module the five convs qkv, proj, pe (attention) and ffn[0], ffn[1] are swapped; the
Ultralytics Conv wrappers around them (BatchNorm, activation) stay in place. C2PSA's own cv1/cv2 are not part of it.
The blocks are found from the module types, so every YOLO11 size works (yolo11x has two PSABlocks, m/l/x have other
widths). Convs that are already quantized stay as they are.
"""

from __future__ import annotations

import torch.nn as nn

from .c2psa_bitlinear_standard import BitLinear_Standard
from .c2psa_bitlinear_ttq import BitLinear_TTQ
from .shadow_weight_manager import PlanError, _set_module, is_quantized

BITLINEAR_CLASSES = {"bitlinear_ttq": BitLinear_TTQ, "bitlinear_standard": BitLinear_Standard}
PSA_CONVS = ("attn.qkv", "attn.proj", "attn.pe", "ffn.0", "ffn.1")


def _psa_types():
    from ultralytics.nn.modules.block import C2PSA, PSABlock

    return C2PSA, PSABlock


def psa_blocks(model: nn.Module) -> list[str]:
    """Paths of every PSABlock inside a C2PSA module of `model`."""
    c2psa_cls, block_cls = _psa_types()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, c2psa_cls):
            out += [f"{name}.{sub}" if name else sub for sub, b in m.named_modules() if isinstance(b, block_cls)]
    return out


def c2psa_convs(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> conv (plain or already quantized) for the five convs of every PSABlock in every C2PSA."""
    out = {}
    for block_path in psa_blocks(model):
        block = model.get_submodule(block_path)
        for sub in PSA_CONVS:
            try:
                conv = block.get_submodule(f"{sub}.conv")
            except AttributeError as e:
                raise PlanError(f"{block_path}.{sub} has no `.conv`: not the Ultralytics PSABlock layout") from e
            if not isinstance(conv, nn.Conv2d):
                raise PlanError(f"{block_path}.{sub}.conv is {type(conv).__name__}, not a conv")
            out[f"{block_path}.{sub}.conv"] = conv
    return out


def bitlinear_settings(mode: str, threshold: float = 0.7, act_bits: int = 8, per_token: bool = True,
                       rule: str = "mean", scale_grad: str = "paper") -> dict:
    """Constructor settings of the BitLinear class of `mode` (standard BitLinear has no threshold or scales)."""
    if mode not in BITLINEAR_CLASSES:
        raise PlanError(f"unknown C2PSA mode {mode!r}; valid: {', '.join(BITLINEAR_CLASSES)}")
    common = {"act_bits": int(act_bits), "per_token": bool(per_token)}
    if mode == "bitlinear_ttq":
        return {"threshold": float(threshold), "rule": rule, "scale_grad": scale_grad, **common}
    return common


def replace_c2psa(model: nn.Module, mode: str, threshold: float = 0.7, act_bits: int = 8, per_token: bool = True,
                  rule: str = "mean", scale_grad: str = "paper") -> list[str]:
    """Swap the PSABlock convs of every C2PSA for BitLinear layers of `mode` (bitlinear_ttq | bitlinear_standard),
    each initialised from the conv it replaces. Returns the paths replaced now (already quantized ones are kept)."""
    cls = BITLINEAR_CLASSES.get(mode)
    settings = bitlinear_settings(mode, threshold, act_bits, per_token, rule, scale_grad)
    targets = c2psa_convs(model)
    if not targets:
        raise PlanError(f"{type(model).__name__} has no C2PSA block to replace")
    replaced = []
    for path, conv in targets.items():
        if is_quantized(conv):
            continue
        _set_module(model, path, cls.from_conv(conv, **settings))
        replaced.append(path)
    try:
        from ultralytics.utils import LOGGER

        LOGGER.info(f"C2PSA: {len(replaced)} convs -> {cls.__name__} in {len(psa_blocks(model))} PSABlocks "
                    f"({len(targets) - len(replaced)} already quantized)")
    except ImportError:  # pragma: no cover
        pass
    return replaced
