"""Packed ternary format: a real on-disk encoding of a ternary YOLO model, and the loader that undoes it.

One safetensors file (no pickle) with one tensor per entry, so that safetensors itself records and checks every
dtype, shape and offset, and JSON metadata under the header key `yolo_tq`. For a state-dict key K:

  K.codes, K.scales    ternary weight: uint8 base-3 codes, 5 per byte (1.6 bits each; 0 -> 0, 1 -> +Wp, 2 -> -Wn,
                       padded to a whole byte), and float32 (Wp, Wn)
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

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..io import MODEL_SIZES, CheckpointError, atomic_write_bytes
from ..quant.apply import is_quantized, paths_filter, quantize_, register_builder
from ..quant.layers import BitConv2d, PackedBitLinear
from ..quant.spec import QuantSpec
from ..quant.ternary import ternary_values

FORMAT_NAME = "yolo-tq-packed"
FORMAT_VERSION = 2  # 1: concatenated blobs indexed by a JSON list; 2: one safetensors tensor per entry
META_KEY = "yolo_tq"
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
REST_PRECISIONS = ("int8", "fp16")
SUPPORTED_MODEL_CLASSES = ("DetectionModel",)
_POW3 = torch.tensor([3**i for i in range(TRITS_PER_BYTE)], dtype=torch.int16)
KIND_SUFFIXES = {"ternary": (".codes", ".scales"), "int8": (".int8", ".scale"), "bn": (".bn_scale", ".bn_shift")}
RESERVED_SUFFIXES = tuple(s for pair in KIND_SUFFIXES.values() for s in pair)
# what a file may describe (the loader builds nothing else; see check_metadata)
MAX_NC, MAX_NAME = 10_000, 256  # classes, characters of a class name
YAML_UNCOMPARED = ("nc", "yaml_file", "channels", "ch")  # nc is bounded, channels must be 3, yaml_file is unused
METADATA_KEYS = ("format", "format_version", "model_class", "task", "yaml", "nc", "names", "stride",
                 "rest_precision", "ternary_layers", "codes", "modules", "source")
RECORD_FIELDS = ("kind", "source_class", "act_bits", "per_token", "restore_token_stats", "norm_eps")
BITLINEAR_CLASSES = ("BitLinear_TTQ", "BitLinear_Standard", "PackedBitLinear")


class PackError(CheckpointError):
    """A model that cannot be packed, or a packed file that is corrupt, truncated or inconsistent."""


# ---------------------------------------------------------------------------------------------------- pure math
def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes in {0, 1, 2} -> uint8 bytes, 5 codes per byte (base 3, first code least significant)."""
    c = codes.reshape(-1).to(torch.int16)
    if c.numel() and (c.min() < 0 or c.max() > 2):
        raise ValueError("ternary codes must be 0, 1 or 2")
    c = torch.cat([c, c.new_zeros((-c.numel()) % TRITS_PER_BYTE)]).view(-1, TRITS_PER_BYTE)
    return (c * _POW3).sum(1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes from pack_trits -> the first `n` codes (uint8 in {0, 1, 2})."""
    p = packed.reshape(-1).to(torch.int16)
    if p.numel() != packed_trit_bytes(n):
        raise PackError(f"{p.numel()} code bytes cannot hold exactly {n} ternary codes")
    if p.numel() and p.max() > 3**TRITS_PER_BYTE - 1:
        raise PackError(f"byte value {int(p.max())} is not a base-3 code (corrupt file)")
    digits = (p.unsqueeze(1) // _POW3) % 3
    return digits.reshape(-1)[:n].to(torch.uint8)


def packed_trit_bytes(n: int) -> int:
    return math.ceil(n / TRITS_PER_BYTE)


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(codes, Wp, Wn) of a tensor holding only {-Wn, 0, +Wp}: 0 -> 0, +Wp -> 1, -Wn -> 2."""
    w = w.detach().float().reshape(-1)
    wp = float(w.max().clamp_min(0)) if w.numel() else 0.0
    wn = float((-w.min()).clamp_min(0)) if w.numel() else 0.0
    codes = torch.zeros_like(w, dtype=torch.uint8)
    codes[w > 0] = 1
    codes[w < 0] = 2
    if not torch.equal(decode_ternary(codes, wp, wn, w.shape), w):
        raise ValueError("tensor is not ternary (more than one positive or one negative value)")
    return codes, wp, wn


def decode_ternary(codes: torch.Tensor, wp: float, wn: float, shape) -> torch.Tensor:
    """Float32 tensor {0, +Wp, -Wn} from codes {0, 1, 2}."""
    table = torch.tensor([0.0, wp, -wn], dtype=torch.float32)
    return table[codes.long()].reshape(tuple(shape))


def quantize_int8_per_channel(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: scale_c = max|w_c| / 127 (rounded up to `scale_dtype`, so no code is
    clipped), q = round(w / scale_c) in [-127, 127]. Returns (q int8 of w's shape, scales of `scale_dtype`).
    ValueError if a non-zero scale would overflow or be subnormal in `scale_dtype` (use float32 then)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    amax = w2.abs().amax(1)
    scale = (amax / 127).to(scale_dtype)
    low = scale.float() * 127 < amax
    if low.any():
        scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
    tiny = (amax > 0) & (scale.float() < torch.finfo(scale_dtype).tiny)  # subnormal: the step would be coarse
    if not torch.isfinite(scale).all() or tiny.any():
        raise ValueError(f"a per-channel scale does not fit {scale_dtype}")
    s = scale.float().unsqueeze(1)
    q = torch.round(w2 / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights from INT8 codes and per-output-channel scales."""
    return (q.float().reshape(q.shape[0], -1) * scale.float().unsqueeze(1)).reshape(q.shape)


def bn_affine(weight, bias, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (eval) as y = x*scale + shift."""
    scale = weight.float() / torch.sqrt(running_var.float() + eps)
    return scale, bias.float() - running_mean.float() * scale


def bn_from_affine(scale, shift, eps: float) -> dict[str, torch.Tensor]:
    """BatchNorm tensors that compute y = x*scale + shift in eval mode."""
    scale, shift = scale.float(), shift.float()
    return {"weight": scale, "bias": shift, "running_mean": torch.zeros_like(scale),
            "running_var": torch.full_like(scale, 1.0 - eps)}


# ------------------------------------------------------------------------------------------------------ packing
def is_ternary_tensor(w: torch.Tensor) -> bool:
    """The project's rule (yolo_tq.quant.ternary.ternary_values), after a cheap reject: a tensor whose first 64
    values already hold more than three distinct ones is not ternary, so it need not be sorted whole."""
    if torch.unique(w.detach().reshape(-1)[:64]).numel() > 3:
        return False
    return ternary_values(w) is not None


def is_bitlinear(m: nn.Module) -> bool:
    """A BitLinear convolution of this project (BitLinear_TTQ, standard BitLinear, or a PackedBitLinear)."""
    return isinstance(m, BitConv2d)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _inside_dfl(path: str, modules: dict[str, nn.Module]) -> bool:
    """Inside Ultralytics' DFL, whose conv is a fixed 0..15 projection (kept FP16, where it is exact)."""
    parts = path.split(".")
    return any(type(modules.get(".".join(parts[:i]))).__name__ == "DFL" for i in range(1, len(parts) + 1))


def _owner(key: str, owners: dict[str, nn.Module]) -> str | None:
    """The path in `owners` that `key` lies under, if any."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in owners), None)


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
    return {f"{key}.codes": pack_trits(codes), f"{key}.scales": torch.tensor([wp, wn], dtype=torch.float32)}


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
    """A tensor outside BatchNorm and BitLinear: ternary if it is a ternary weight, else INT8 (weights, with
    rest='int8') or FP16; non-float tensors as they are."""
    if key.endswith(RESERVED_SUFFIXES):
        raise PackError(f"state key {key!r} ends with a suffix the format reserves ({', '.join(RESERVED_SUFFIXES)})")
    if not t.is_floating_point():
        return {key: t.detach().cpu().clone().contiguous()}
    weight_like = key.endswith(".weight") and t.dim() >= 2 and not in_dfl
    if weight_like and is_ternary_tensor(t):
        return ternary_entries(key, t)
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
    owners = {p: m for p, m in modules.items() if p and (is_bitlinear(m) or _is_bn(m))}
    tensors: dict[str, torch.Tensor] = {}
    for path, m in owners.items():
        _add(tensors, bitlinear_entries(path, m) if is_bitlinear(m) else bn_entries(path, m))
    for key, t in model.state_dict().items():
        if _owner(key, owners) is None:
            _add(tensors, plain_entries(key, t.detach().cpu(), rest, _inside_dfl(key.rpartition(".")[0], modules)))
    if require_ternary and not any(k.endswith(".codes") for k in tensors):
        raise PackError("no ternary weights found (judged from the weights): this is not a ternary model")
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
        "codes": {"ternary": "base-3, 5 per byte, 0->0 1->+Wp 2->-Wn", "int8": "symmetric per output channel"},
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
    tensors, _, skeleton = _open_packed(path)
    check = verify_round_trip(model, _fill(skeleton, tensors, str(path)), tensors)
    if not check["ok"]:
        raise PackError(f"{path}: round trip failed: {check}")
    return check


# ------------------------------------------------------------------------------------------- metadata checks
_ABSENT = object()


def _short(value, limit: int = 70) -> str:
    """repr of an untrusted value, on one line and shortened."""
    text = repr(value) if value is not _ABSENT else "absent"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _same(a, b) -> bool:
    """Equal as JSON (so true is not 1 and 1.0 is not 1)."""
    if a is _ABSENT or b is _ABSENT:
        return a is b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _first_difference(got, want, where: str, depth: int = 0) -> str:
    """Where `got` (from a file) first differs from `want` (Ultralytics'), lists entry by entry, both shortened."""
    if depth < 4 and isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if not _same(a, b))
        return _first_difference(got[i], want[i], f"{where}[{i}]", depth + 1)
    return f"{where} is {_short(got)}, Ultralytics' has {_short(want)}"


@functools.lru_cache(maxsize=None)
def _reference_yaml_text(scale: str) -> str:
    from ultralytics.nn.tasks import yaml_model_load

    return json.dumps(yaml_model_load(f"yolo11{scale}.yaml"))


def reference_yaml(scale: str) -> dict:
    """Ultralytics' own YOLO11 detection yaml of `scale` (its yaml loading), as the file's JSON would hold it."""
    return json.loads(_reference_yaml_text(scale))


def known_architecture(yaml) -> dict:
    """The Ultralytics YOLO11 yaml that an architecture yaml (from a file) equals; PackError naming the first
    difference. Compared as JSON: every key but nc (bounded separately), yaml_file (a name, never used) and the
    input channels (must be 3). The model is then built from the reference, never from the file's yaml."""
    if not isinstance(yaml, dict):
        raise PackError("metadata 'yaml' is not a mapping")
    scale = yaml.get("scale")
    if not isinstance(scale, str) or scale not in MODEL_SIZES:
        raise PackError(f"architecture scale {_short(scale)} is not a YOLO11 scale ({', '.join(MODEL_SIZES)}): "
                        f"only Ultralytics YOLO11 detection architectures are loaded")
    ref = reference_yaml(scale)
    for key in ("channels", "ch"):
        if yaml.get(key, 3) != 3:
            raise PackError(f"architecture yaml: {key} is {_short(yaml.get(key))}, YOLO11 takes 3 input channels")
    for key in sorted((set(yaml) | set(ref)) - set(YAML_UNCOMPARED)):
        got, want = yaml.get(key, _ABSENT), ref.get(key, _ABSENT)
        if not _same(got, want):
            raise PackError(f"architecture yaml is not Ultralytics' yolo11{scale}.yaml: "
                            f"{_first_difference(got, want, repr(key))}")
    return ref


def _check_nc_names(meta: dict) -> int:
    """nc (an int in 1..MAX_NC, the yaml's too) and names ('0'..'nc-1' -> str); returns nc."""
    nc = meta.get("nc")
    if type(nc) is not int or not 1 <= nc <= MAX_NC:
        raise PackError(f"metadata nc is {_short(nc)}: the number of classes must be an integer in 1..{MAX_NC}")
    if meta["yaml"].get("nc", nc) != nc:
        raise PackError(f"metadata nc {nc} and the yaml's nc {_short(meta['yaml'].get('nc'))} differ")
    names = meta.get("names")
    if not isinstance(names, dict) or len(names) != nc or \
            any(not isinstance(names.get(str(i)), str) or len(names[str(i)]) > MAX_NAME for i in range(nc)):
        raise PackError(f"metadata 'names' must map '0'..'{nc - 1}' to class names of at most {MAX_NAME} "
                        f"characters (nc = {nc})")
    return nc


def _check_info(meta: dict) -> None:
    """The informational fields: stride, rest precision, ternary layers, source."""
    stride = meta.get("stride")
    if stride is not None and not (isinstance(stride, list) and len(stride) <= 8 and all(
            type(s) in (int, float) and 0 < s <= 1024 for s in stride)):  # comparisons: no overflow, NaN fails
        raise PackError(f"metadata stride {_short(stride)} is not a short list of positive numbers")
    if meta.get("rest_precision") not in REST_PRECISIONS:
        raise PackError(f"metadata rest_precision {_short(meta.get('rest_precision'))} is not one of "
                        f"{', '.join(REST_PRECISIONS)}")
    layers = meta.get("ternary_layers")
    if not isinstance(layers, list) or any(type(i) is not int or not 0 <= i < 1000 for i in layers):
        raise PackError(f"metadata ternary_layers {_short(layers)} is not a list of layer indices")
    if not isinstance(meta.get("source"), (str, type(None))) or len(meta.get("source") or "") > 4096:
        raise PackError("metadata 'source' must be a file name")
    codes = meta.get("codes", {})
    if not isinstance(codes, dict) or any(not isinstance(v, str) or len(v) > 200 for v in codes.values()):
        raise PackError("metadata 'codes' must map kinds to short descriptions")


def check_metadata(meta) -> dict:
    """Validate a packed file's metadata without building anything; returns the reference yaml (with nc) that
    the model is built from. PackError names the first field that is wrong."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise PackError(f"metadata does not describe a {FORMAT_NAME} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackError(f"format version {_short(meta.get('format_version'))} is not supported "
                        f"(this code reads version {FORMAT_VERSION})")
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise PackError(f"metadata holds unknown fields {_short(unknown)}")
    if meta.get("model_class") not in SUPPORTED_MODEL_CLASSES or meta.get("task") != "detect":
        raise PackError(f"packed model class {_short(meta.get('model_class'))} (task {_short(meta.get('task'))}) "
                        f"is not supported ({', '.join(SUPPORTED_MODEL_CLASSES)}, detect)")
    ref = known_architecture(meta.get("yaml"))
    ref["nc"] = _check_nc_names(meta)
    _check_info(meta)
    records = meta.get("modules", {})
    if not isinstance(records, dict):
        raise PackError("metadata 'modules' must map module paths to their settings")
    for path, rec in records.items():
        PackedBitLinearConfig.from_record(path, rec)
    return ref


# ------------------------------------------------------------------------------------------------------ loading
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _parse_metadata(header: dict | None) -> dict:
    if not header or META_KEY not in header:
        raise PackError(f"a safetensors file but not a packed YOLO-TQ model (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, ints beyond Python's digit limit, deep nesting
        raise PackError(f"metadata is not valid JSON: {_short(str(e), 200)}") from e
    check_metadata(meta)
    return meta


def _open_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, nn.Module]:
    """(tensors, metadata, the model the metadata describes with its BitLinear layers, random weights). Order: the
    metadata is checked, the model built from the known yaml, every tensor's dtype and shape compared, from the
    safetensors header, with what that model needs; only then is any tensor read. Nothing is unpickled."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"packed file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = _parse_metadata(f.metadata())
            model = skeleton_model(meta)
            found = {}
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = piece.get_dtype()
                found[name] = (_SAFETENSORS_DTYPES.get(dtype, dtype), tuple(piece.get_shape()))
            check_layout(expected_layout(model, set(found)), found)
            tensors = {name: f.get_tensor(name) for name in found}
        _check_finite(tensors)
    except PackError as e:
        raise PackError(f"{p}: {e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise PackError(f"{p} is not a readable packed file (corrupt or truncated?): {type(e).__name__}: "
                        f"{_short(str(e), 300)}") from e
    return tensors, meta, model


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a packed file, every tensor checked against the model the metadata describes
    before it is read (see _open_packed)."""
    tensors, meta, _ = _open_packed(path)
    return tensors, meta


def entry_kinds(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """State key (BatchNorm: module path) -> ternary | int8 | bn | fp16 | raw, from the names and dtypes."""
    kinds = {name[:-len(pair[0])]: kind for name in tensors for kind, pair in KIND_SUFFIXES.items()
             if name.endswith(pair[0])}
    parts = {key + s for key, kind in kinds.items() for s in KIND_SUFFIXES[kind]}
    kinds.update((name, "fp16" if t.dtype == torch.float16 else "raw") for name, t in tensors.items()
                 if name not in parts)
    return kinds


Layout = dict  # entry name -> (allowed dtypes, shape) expected, or (dtype, shape) found


def stored_entries(key: str, target: torch.Tensor, names: set[str]) -> Layout:
    """The entries that hold state key `key` (the model's tensor `target`), with their dtypes and shapes; which
    kind (ternary, INT8, as is) follows from the names the file holds."""
    if f"{key}.codes" in names:
        return {f"{key}.codes": ((torch.uint8,), (packed_trit_bytes(target.numel()),)),
                f"{key}.scales": ((torch.float32,), (2,))}
    if f"{key}.int8" in names and target.dim() >= 2:
        return {f"{key}.int8": ((torch.int8,), tuple(target.shape)),
                f"{key}.scale": ((torch.float16, torch.float32), tuple(target.shape[:1]))}
    return {key: ((torch.float16,) if target.is_floating_point() else (target.dtype,), tuple(target.shape))}


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and _is_bn(m)}


def _stored_key(key: str) -> str:
    """A PackedBitLinear's `latent_weight` is stored as its `weight`."""
    return key[:-len("latent_weight")] + "weight" if key.endswith(".latent_weight") else key


def expected_layout(model: nn.Module, names: set[str]) -> Layout:
    """Every entry a file must hold for `model` (built from the metadata): name -> (dtypes, shape)."""
    bns = _batchnorms(model)
    out = {f"{p}.{s}": ((torch.float16,), tuple(bn.running_mean.shape)) for p, bn in bns.items()
           for s in ("bn_scale", "bn_shift")}
    for key, target in model.state_dict().items():
        if _owner(key, bns) is None:
            out.update(stored_entries(_stored_key(key), target, names))
    return out


def check_layout(expected: Layout, found: Layout) -> None:
    """PackError for the first entry missing, of another dtype or shape, or that the model has no place for."""
    for name, (dtypes, shape) in expected.items():
        if name not in found:
            raise PackError(f"tensor '{name}' is missing from the file")
        dtype, got = found[name]
        if dtype not in dtypes:
            raise PackError(f"tensor '{name}' is {dtype}, the format stores it as {' or '.join(map(str, dtypes))}")
        if tuple(got) != tuple(shape):
            raise PackError(f"tensor '{name}' has shape {_short(list(got))}, the model built from the yaml needs "
                            f"{list(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PackError(f"the file holds tensors the model built from its yaml has no place for: {_short(extra[:3])}")


def decode_tensor(tensors: dict[str, torch.Tensor], key: str, target: torch.Tensor) -> torch.Tensor:
    """The tensor stored for state key `key`, decoded to the dtype and shape of `target` (float32 for floats);
    the layout has been checked (check_layout)."""
    if f"{key}.codes" in tensors:
        wp, wn = tensors[f"{key}.scales"].tolist()
        if wp < 0 or wn < 0 or not math.isfinite(wp) or not math.isfinite(wn):
            raise PackError(f"{key}: ternary scales must be finite and >= 0 (got {wp}, {wn})")
        codes = unpack_trits(tensors[f"{key}.codes"], target.numel())
        return decode_ternary(codes, wp, wn, target.shape)
    if f"{key}.int8" in tensors and target.dim() >= 2:
        return dequantize_int8(tensors[f"{key}.int8"], tensors[f"{key}.scale"])
    return tensors[key].float() if target.is_floating_point() else tensors[key]


def decode_state(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` (built from the metadata, BitLinear layers installed) decoded from the file's
    tensors, after checking their names, dtypes and shapes; BatchNorm comes from its affine pair. PackError if a
    decoded tensor holds NaN or Inf."""
    check_layout(expected_layout(model, set(tensors)), {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    bns, state = _batchnorms(model), {}
    for path, bn in bns.items():
        pair = (tensors[f"{path}.bn_scale"], tensors[f"{path}.bn_shift"])
        state.update((f"{path}.{a}", t) for a, t in bn_from_affine(*pair, bn.eps).items())
    for key, target in model.state_dict().items():
        if _owner(key, bns) is None:
            state[key] = decode_tensor(tensors, _stored_key(key), target)
    _check_finite(state, "decodes to")
    return state


def _check_finite(tensors: dict[str, torch.Tensor], what: str = "holds") -> None:
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:
        raise PackError(f"tensor '{bad}' {what} NaN or Inf values (corrupt file)")


def build_model(meta: dict) -> nn.Module:
    """The Ultralytics model the metadata describes (random weights), built from Ultralytics' own YOLO11 yaml
    that the metadata's yaml equals (check_metadata), never from the file's yaml; its stride must match."""
    from ultralytics.nn.tasks import DetectionModel

    ref = check_metadata(meta)
    model = DetectionModel(ref, nc=ref["nc"], verbose=False)
    stride = meta.get("stride")
    if stride is not None and [float(s) for s in stride] != model.stride.tolist():
        raise PackError(f"metadata stride {_short(stride)} does not match the architecture's "
                        f"{model.stride.tolist()}")
    model.names = {int(k): v for k, v in meta["names"].items()}
    return model


def skeleton_model(meta: dict) -> nn.Module:
    """build_model with the metadata's BitLinear layers installed: the model the file's tensors must fit."""
    model = build_model(meta)
    install_packed_modules(model, meta.get("modules", {}))
    return model


@dataclass(frozen=True)
class PackedBitLinearConfig:
    """quantize_ config of a packed BitLinear record: a conv becomes a PackedBitLinear with these settings."""

    spec: QuantSpec
    norm_eps: float

    @classmethod
    def from_record(cls, path, rec) -> "PackedBitLinearConfig":
        """The config of a metadata record; PackError unless every field has its exact type and a sane value."""
        if not isinstance(path, str) or not isinstance(rec, dict) or set(rec) != set(RECORD_FIELDS) \
                or rec["kind"] != "bitlinear" or rec["source_class"] not in BITLINEAR_CLASSES:
            raise PackError(f"metadata module {_short(path)}: bad settings {_short(rec, 200)}; a record holds "
                            f"{', '.join(RECORD_FIELDS)}, kind 'bitlinear', source_class one of "
                            f"{', '.join(BITLINEAR_CLASSES)}")
        problems = [f for f, ok in (
            ("act_bits", type(rec["act_bits"]) is int and 2 <= rec["act_bits"] <= 16),
            ("per_token", type(rec["per_token"]) is bool),
            ("restore_token_stats", type(rec["restore_token_stats"]) is bool),
            ("norm_eps", type(rec["norm_eps"]) in (int, float) and 0 < rec["norm_eps"] < 1)) if not ok]
        if problems:
            raise PackError(f"metadata module {_short(path)} has bad settings: {problems[0]} is "
                            f"{_short(rec[problems[0]])} (act_bits: an integer in 2..16, per_token and "
                            f"restore_token_stats: true/false, norm_eps: a number in (0, 1))")
        spec = QuantSpec("bitlinear_ttq", act_bits=rec["act_bits"], act_per_token=rec["per_token"],
                         restore_token_stats=rec["restore_token_stats"])
        return cls(spec, float(rec["norm_eps"]))


def _build_packed_bitlinear(conv: nn.Module, config: PackedBitLinearConfig) -> PackedBitLinear:
    if type(conv) is not nn.Conv2d:
        raise PackError(f"a packed BitLinear record names a {type(conv).__name__}, not a plain conv")
    q = PackedBitLinear(conv, config.spec)
    q.norm.eps = config.norm_eps
    return q


register_builder(PackedBitLinearConfig, _build_packed_bitlinear)


def install_packed_modules(model: nn.Module, records: dict) -> list[str]:
    """Put a PackedBitLinear (through quantize_) at every path the metadata's `modules` names, in place of the
    plain conv the yaml built there. Only the convs of the model's C2PSA blocks can be named. Returns the paths."""
    from ..quant.apply import c2psa_convs

    if not isinstance(records, dict):
        raise PackError("metadata 'modules' must map module paths to their settings")
    allowed = c2psa_convs(model)
    by_config: dict[PackedBitLinearConfig, list[str]] = {}
    for path, rec in records.items():
        config = PackedBitLinearConfig.from_record(path, rec)
        if path not in allowed:
            raise PackError(f"metadata names module {_short(path)}, which is not a C2PSA conv of the model built "
                            f"from the yaml (BitLinear layers are only loaded there)")
        by_config.setdefault(config, []).append(path)
    return [p for config, paths in by_config.items() for p in quantize_(model, config, paths_filter(paths))]


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild an ordinary Ultralytics model (float32, eval mode) from a packed file."""
    tensors, meta, model = _open_packed(path)
    return _fill(model, tensors, str(path))


def model_from_packed(tensors: dict[str, torch.Tensor], meta: dict, source: str = "packed file") -> nn.Module:
    """The model a packed file's (tensors, metadata) describe (float32, eval mode); PackError for anything wrong."""
    try:
        model = skeleton_model(meta)
    except PackError as e:
        raise PackError(f"{source}: {e}") from e
    return _fill(model, tensors, source)


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """`model` (a skeleton_model) with the decoded weights, float32, eval mode."""
    try:
        state = decode_state(tensors, model)
    except PackError as e:
        raise PackError(f"{source}: {e}") from e
    model.load_state_dict(state, strict=False)
    return model.float().eval()


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
    ternary tensors must be equal, INT8 ones within half a quantization step (per output channel), FP16 ones
    within FP16 rounding; each BatchNorm is compared as the affine map it computes in eval mode."""
    src, out = _TensorView(source), _TensorView(unpacked)
    rep = {"ternary": 0, "ternary_identical": 0, "int8": 0, "int8_max_err_steps": 0.0, "fp16": 0,
           "fp16_max_rel_err": 0.0, "bn": 0, "bn_max_rel_err": 0.0}
    for name, kind in entry_kinds(tensors).items():
        if kind == "ternary":
            rep["ternary_identical"] += int(torch.equal(src[name].float(), out[name].float()))
        elif kind == "int8":
            rep["int8_max_err_steps"] = max(rep["int8_max_err_steps"], _int8_err_steps(src[name], out[name]))
        elif kind == "fp16":
            rep["fp16_max_rel_err"] = max(rep["fp16_max_rel_err"], _rel(out[name], src[name]))
        elif kind == "bn":
            rep["bn_max_rel_err"] = max(rep["bn_max_rel_err"], _bn_rel_err(source.get_submodule(name),
                                                                           unpacked.get_submodule(name)))
        if kind in rep:
            rep[kind] += 1
    rep["ok"] = rep["ternary_identical"] == rep["ternary"] and rep["int8_max_err_steps"] <= 0.5 + 1e-3
    return rep


def unpack_to_checkpoint(packed: str | Path, out: str | Path) -> Path:
    """Write the unpacked model as an ordinary Ultralytics .pt (FP16 pickle, as Ultralytics saves weights), so
    that `ultralytics.YOLO(out)` and the project's validate() can use it."""
    from ..io import save_stock_checkpoint

    model = load_packed(packed)
    return save_stock_checkpoint(model, out, extra={"packed_source": str(packed)})
