"""Packed ternary format: a real on-disk encoding of a ternary YOLO model, and the loader that undoes it.

One safetensors file (no pickle) with one tensor per entry, so that safetensors itself records and checks every
dtype, shape and offset, and JSON metadata under the header key `yolo_tq`. For a state-dict key K:

  K.codes, K.scales    ternary weight: uint8 base-3 codes, 5 per byte (1.6 bits each; 0 -> 0, 1 -> +Wp, 2 -> -Wn,
                       padded to a whole byte), and float32 (Wp, Wn)
  K.gridB, K.steps     integer-grid weight (LSQ, B = 2 or 4 bits): uint8 codes, 8/B per byte (offset by 2^(B-1)),
                       and a float32 step per output channel; decoded weight = code x step, exactly
  K.int8, K.scale      other weights (ndim >= 2): int8 codes in [-127, 127] of K's shape, symmetric per output
                       channel, and a float16 scale per output channel (float32 where one would overflow FP16 or
                       be subnormal)
  K                    everything else: float16 (biases, the DFL projection, a fixed 0..15 ramp INT8 would not keep
                       exact, and with rest="fp16" the other weights too); non-float tensors as they are
  P.bn_scale, P.bn_shift   BatchNorm module P as the FP16 affine pair y = x*scale + shift (see below)

The metadata holds the format version, the architecture yaml, class names, stride, the rest precision, which yaml
layers hold ternary weights, and `modules`: a record per BitLinear layer (path -> act_bits, per_token,
restore_token_stats, LayerNorm eps). A BitLinear layer (BitLinear_TTQ, standard BitLinear in C2PSA) is stored as its
ternary weight (P.weight.codes, P.weight.scales: Ap/An, or β twice), and its bias, LayerNorm and out_scale in FP16;
its training state (latent weight, threshold) is not stored. The loader puts a PackedBitLinear (fixed ternary
weight, BitLinear's activation path) at those paths through quantize_. TTQConv2d training modules are not packed
directly: pack the stock ternary export (plain convs).

BatchNorm is not folded into the convs: folding multiplies each output channel by its own factor, so a ternary
conv would stop being {-Wn, 0, +Wp}. Each BN is restored as weight=scale, bias=shift, running_mean=0,
running_var=1-eps, which computes the same function in eval mode. The file is an inference artifact: fine-tune
from the .pt, not from an unpacked model.

A packed file is data, never code. The loader (read_packed, load_packed) builds only what it knows: the stored
yaml must equal, key by key as JSON, Ultralytics' own yolo11{n,s,m,l,x}.yaml (bar nc, yaml_file and 3 input
channels), and the model is built from that reference yaml, never from the file's, so no stored string is ever
eval'ed or looked up as a Python name. Before anything is allocated: nc must be an integer in 1..10000 with names
'0'..'nc-1'; every field of the metadata has a fixed type (unknown fields are refused); BitLinear records may only
name the C2PSA convs of the built model, with act_bits in 2..16 and booleans as booleans; then every tensor's dtype
and shape is read from the safetensors header and compared with what the built model needs (missing, extra,
other dtype or shape: refused) before any tensor is read. Decoded weights must be finite. Every refusal is one
PackError line. Packing runs the same checks, so it never writes a file the loader refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..io import atomic_write_bytes
from ..quant.apply import is_quantized
from ..quant.layers import BitConv2d
from ..quant.ternary import ternary_values
from .codes import PackError, bn_affine, grid_codes, pack_bits, pack_trits, quantize_int8_per_channel, ternary_codes
from .layout import RESERVED_SUFFIXES, is_batchnorm, owner_path
from .metadata import (FORMAT_NAME, FORMAT_VERSION, META_KEY, REST_PRECISIONS, SUPPORTED_MODEL_CLASSES, check_metadata,
                       known_architecture)
from .reader import FP16_MAX, fill_model, open_packed
from .verify import verify_round_trip


def is_ternary_tensor(w: torch.Tensor) -> bool:
    """The project's rule (yolo_tq.quant.ternary.ternary_values), after a cheap reject: a tensor whose first 64
    values already hold more than three distinct ones is not ternary, so it need not be sorted whole."""
    if torch.unique(w.detach().reshape(-1)[:64]).numel() > 3:
        return False
    return ternary_values(w) is not None


def is_bitlinear(m: nn.Module) -> bool:
    """A BitLinear convolution of this project (BitLinear_TTQ, standard BitLinear, or a PackedBitLinear)."""
    return isinstance(m, BitConv2d)


def _inside_dfl(path: str, modules: dict[str, nn.Module]) -> bool:
    """Inside Ultralytics' DFL, whose conv is a fixed 0..15 projection (kept FP16, where it is exact)."""
    parts = path.split(".")
    return any(type(modules.get(".".join(parts[:i]))).__name__ == "DFL" for i in range(1, len(parts) + 1))


def _to_fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    h = t.detach().cpu().float().half().contiguous()
    if not torch.isfinite(h).all() and torch.isfinite(t).all():
        raise PackError(f"{name} has values beyond the FP16 range")
    return h


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


def check_packable(model: nn.Module) -> None:
    """An ordinary Ultralytics model of a supported class, with a yaml, holding only stock modules."""
    name = type(model).__name__
    if name not in SUPPORTED_MODEL_CLASSES:
        raise PackError(f"cannot pack a {name}: supported model classes are {', '.join(SUPPORTED_MODEL_CLASSES)}")
    if not isinstance(getattr(model, "yaml", None), dict):
        raise PackError("the model has no architecture yaml (model.yaml); it cannot be rebuilt from a packed file")
    try:
        yaml = json.loads(json.dumps(model.yaml))
    except (TypeError, ValueError) as e:
        raise PackError(f"the model's architecture yaml is not JSON-serialisable: {e}") from e
    try:
        known_architecture(yaml)
    except PackError as e:
        raise PackError(f"cannot pack this model (the loader only builds Ultralytics YOLO11 detectors): {e}") from e
    odd = [f"{p} ({type(m).__name__})" for p, m in model.named_modules() if is_quantized(m) and not is_bitlinear(m)]
    if odd:
        raise PackError(f"the model still holds quantized training modules: {', '.join(odd[:3])}"
                        f"{' ...' if len(odd) > 3 else ''}; pack its stock ternary export instead")


def ternary_entries(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """K.codes (5 codes per byte) and K.scales (Wp, Wn) of a ternary tensor."""
    codes, wp, wn = ternary_codes(w)
    if max(wp, wn) > FP16_MAX:
        raise PackError(f"{key} has ternary scales beyond the FP16 range ({wp:g}, {wn:g})")
    return {f"{key}.codes": pack_trits(codes), f"{key}.scales": torch.tensor([wp, wn], dtype=torch.float32)}


def grid_entries(key: str, codes: torch.Tensor, steps: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """K.grid<bits> (8/bits codes per byte) and K.steps (float32 per output channel) of an integer-grid tensor."""
    return {f"{key}.grid{bits}": pack_bits(codes, bits), f"{key}.steps": steps.float().contiguous()}


def int8_entries(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """K.int8 (w's shape) and K.scale (per output channel: FP16, or FP32 where a scale does not fit FP16)."""
    try:
        q, s = quantize_int8_per_channel(w, torch.float16)
    except ValueError:
        q, s = quantize_int8_per_channel(w, torch.float32)
    return {f"{key}.int8": q.contiguous(), f"{key}.scale": s.contiguous()}


def bn_entries(path: str, bn: nn.Module) -> dict[str, torch.Tensor]:
    """P.bn_scale and P.bn_shift (FP16) of a BatchNorm in eval mode."""
    if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
        raise PackError(f"{path}: BatchNorm without running statistics or affine parameters")
    scale, shift = bn_affine(bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps)
    return {f"{path}.bn_scale": _to_fp16(scale, path), f"{path}.bn_shift": _to_fp16(shift, path)}


def bitlinear_entries(path: str, m: BitConv2d) -> dict[str, torch.Tensor]:
    """A BitLinear layer: its ternary weight, and bias, LayerNorm and out_scale in FP16 (no training state)."""
    w = m.weight.detach().cpu()
    if not is_ternary_tensor(w):
        raise PackError(f"{path} ({type(m).__name__}) has a weight that is not ternary")
    out = ternary_entries(f"{path}.weight", w)
    state = m.state_dict()
    for sub in ("bias", "norm.weight", "norm.bias", "out_scale"):
        if sub in state:
            out[f"{path}.{sub}"] = _to_fp16(state[sub], f"{path}.{sub}")
    return out


def bitlinear_record(m: BitConv2d) -> dict:
    """The metadata record the loader rebuilds a BitLinear layer from."""
    return {"kind": "bitlinear", "source_class": type(m).__name__, "act_bits": int(m.spec.act_bits),
            "per_token": bool(m.spec.act_per_token), "restore_token_stats": bool(m.spec.restore_token_stats),
            "norm_eps": float(m.norm.eps)}


def plain_entries(key: str, t: torch.Tensor, rest: str, in_dfl: bool) -> dict[str, torch.Tensor]:
    """A tensor outside BatchNorm and BitLinear: ternary if it is a ternary weight, integer-grid codes if it is on a
    2- or 4-bit grid per output channel (LSQ), else INT8 (weights, with rest='int8') or FP16; non-float tensors as
    they are."""
    if key.endswith(RESERVED_SUFFIXES):
        raise PackError(f"state key {key!r} ends with a suffix the format reserves ({', '.join(RESERVED_SUFFIXES)})")
    if not t.is_floating_point():
        return {key: t.detach().cpu().clone().contiguous()}
    weight_like = key.endswith(".weight") and t.dim() >= 2 and not in_dfl
    if weight_like and is_ternary_tensor(t):
        return ternary_entries(key, t)
    grid = grid_codes(t) if weight_like else None
    if grid is not None:
        return grid_entries(key, *grid)
    if weight_like and rest == "int8":
        return int8_entries(key, t)
    return {key: _to_fp16(t, key)}


def _add(tensors: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> None:
    clash = set(tensors) & set(entries)
    if clash:
        raise PackError(f"two entries of the packed file would both be named {sorted(clash)[0]!r}")
    tensors.update(entries)


def pack_state(model: nn.Module, rest: str = "int8", source: str | None = None,
               require_ternary: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(safetensors tensors, metadata) of an ordinary Ultralytics model whose ternary layers hold three values."""
    if rest not in REST_PRECISIONS:
        raise PackError(f"unknown precision {rest!r} for the non-ternary weights; valid: {', '.join(REST_PRECISIONS)}")
    check_packable(model)
    modules = dict(model.named_modules())
    owners = {p: m for p, m in modules.items() if p and (is_bitlinear(m) or is_batchnorm(m))}
    tensors: dict[str, torch.Tensor] = {}
    for path, m in owners.items():
        _add(tensors, bitlinear_entries(path, m) if is_bitlinear(m) else bn_entries(path, m))
    for key, t in model.state_dict().items():
        if owner_path(key, owners) is None:
            _add(tensors, plain_entries(key, t.detach().cpu(), rest, _inside_dfl(key.rpartition(".")[0], modules)))
    if require_ternary and not any(k.endswith((".codes", ".steps")) for k in tensors):
        raise PackError("no ternary or integer-grid weights found (judged from the weights): this is not a "
                        "low-bit model")
    records = {p: bitlinear_record(m) for p, m in owners.items() if is_bitlinear(m)}
    return tensors, pack_metadata(model, rest, source, tensors, records)


def pack_metadata(model: nn.Module, rest: str, source: str | None, tensors: dict, records: dict) -> dict:
    """The JSON metadata: format, architecture, names, stride, rest precision, ternary layers, BitLinear records."""
    stride = getattr(model, "stride", None)
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_class": type(model).__name__,
        "task": "detect", "yaml": model.yaml, "nc": int(model.yaml.get("nc", len(getattr(model, "names", {})))),
        "names": {str(k): v for k, v in dict(getattr(model, "names", {}) or {}).items()},
        "stride": [float(s) for s in stride] if stride is not None else None,
        "rest_precision": rest,
        "ternary_layers": sorted({_layer_of(k) for k in tensors if k.endswith(".codes")} - {None}),
        "codes": {"ternary": "base-3, 5 per byte, 0->0 1->+Wp 2->-Wn", "int8": "symmetric per output channel",
                  "grid": "B-bit codes + 2^(B-1), 8/B per byte, times a step per output channel"},
        "modules": records, "source": source,
    }


def pack_bytes(model: nn.Module, rest: str = "int8", source: str | None = None, require_ternary: bool = True) -> bytes:
    """The packed file's bytes (require_ternary=False also packs a model without ternary weights: INT8/FP16 only)."""
    from safetensors.torch import save

    tensors, meta = pack_state(model, rest, source, require_ternary)
    try:
        text = json.dumps(meta, separators=(",", ":"))
    except TypeError as e:
        raise PackError(f"the model's metadata (yaml, names) is not JSON-serialisable: {e}") from e
    check_metadata(json.loads(text))  # never write a file the loader refuses
    return save(tensors, metadata={"format": "pt", META_KEY: text})


def write_packed(model: nn.Module, path: str | Path, rest: str = "int8", source: str | None = None,
                 require_ternary: bool = True) -> Path:
    """Pack `model` and write the file atomically (yolo_tq.io.atomic_write_bytes)."""
    return atomic_write_bytes(path, pack_bytes(model, rest, source, require_ternary))


def write_verified(model: nn.Module, path: str | Path, rest: str = "int8", data: bytes | None = None,
                   source: str | None = None, require_ternary: bool = True) -> dict:
    """Write the packed file of `model` (`data`: its bytes, if already packed), read it back and check the round
    trip (verify_round_trip); PackError if it fails. Returns the check."""
    path = atomic_write_bytes(path, pack_bytes(model, rest, source, require_ternary) if data is None else data)
    tensors, _, skeleton = open_packed(path)
    check = verify_round_trip(model, fill_model(skeleton, tensors, str(path)), tensors)
    if not check["ok"]:
        raise PackError(f"{path}: round trip failed: {check}")
    return check
