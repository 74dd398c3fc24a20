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

The loader rebuilds an ordinary Ultralytics model from the yaml, takes every tensor it needs by name (checking its
dtype and the shape the rebuilt model needs) and refuses a file holding tensors the model has no place for.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..io import CheckpointError, atomic_write_bytes
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
    tensors, meta = read_packed(path)
    check = verify_round_trip(model, model_from_packed(tensors, meta, str(path)), tensors)
    if not check["ok"]:
        raise PackError(f"{path}: round trip failed: {check}")
    return check


# ------------------------------------------------------------------------------------------------------ loading
def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a packed file; safetensors only, nothing is unpickled."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"packed file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise PackError(f"{p} is not a readable packed file (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if META_KEY not in header:
        raise PackError(f"{p} is a safetensors file but not a packed YOLO-TQ model (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise PackError(f"{p}: metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise PackError(f"{p}: metadata does not describe a {FORMAT_NAME} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackError(f"{p}: format version {meta.get('format_version')} is not supported "
                        f"(this code reads version {FORMAT_VERSION})")
    return tensors, meta


def entry_kinds(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """State key (BatchNorm: module path) -> ternary | int8 | bn | fp16 | raw, from the names and dtypes."""
    kinds = {name[:-len(pair[0])]: kind for name in tensors for kind, pair in KIND_SUFFIXES.items()
             if name.endswith(pair[0])}
    parts = {key + s for key, kind in kinds.items() for s in KIND_SUFFIXES[kind]}
    kinds.update((name, "fp16" if t.dtype == torch.float16 else "raw") for name, t in tensors.items()
                 if name not in parts)
    return kinds


class _Entries:
    """The file's tensors, taken by name with their dtype and shape checked; anything never taken is an error."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.taken = tensors, set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, dtypes: tuple[torch.dtype, ...], shape) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise PackError(f"tensor '{name}' is missing from the file")
        if t.dtype not in dtypes:
            raise PackError(f"tensor '{name}' is {t.dtype}, the format stores it as "
                            f"{' or '.join(map(str, dtypes))}")
        if tuple(t.shape) != tuple(shape):
            raise PackError(f"tensor '{name}' has shape {list(t.shape)}, the model built from the yaml needs "
                            f"{list(shape)}")
        self.taken.add(name)
        return t

    def check_all_taken(self) -> None:
        extra = sorted(set(self.tensors) - self.taken)
        if extra:
            raise PackError(f"the file holds tensors the model built from its yaml has no place for: {extra[:3]}")


def decode_tensor(entries: _Entries, key: str, target: torch.Tensor) -> torch.Tensor:
    """The tensor stored for state key `key`, decoded to the dtype and shape of `target` (float32 for floats)."""
    if f"{key}.codes" in entries:
        n = target.numel()
        wp, wn = entries.take(f"{key}.scales", (torch.float32,), (2,)).tolist()
        if wp < 0 or wn < 0 or not math.isfinite(wp) or not math.isfinite(wn):
            raise PackError(f"{key}: ternary scales must be finite and >= 0 (got {wp}, {wn})")
        codes = unpack_trits(entries.take(f"{key}.codes", (torch.uint8,), (packed_trit_bytes(n),)), n)
        return decode_ternary(codes, wp, wn, target.shape)
    if f"{key}.int8" in entries and target.dim() >= 2:
        q = entries.take(f"{key}.int8", (torch.int8,), target.shape)
        return dequantize_int8(q, entries.take(f"{key}.scale", (torch.float16, torch.float32), target.shape[:1]))
    if target.is_floating_point():
        return entries.take(key, (torch.float16,), target.shape).float()
    return entries.take(key, (target.dtype,), target.shape)


def decode_state(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` (built from the metadata, BitLinear layers installed) decoded from the file's
    tensors. A PackedBitLinear's `latent_weight` is stored as its `weight`; BatchNorm as its affine pair."""
    entries, state = _Entries(tensors), {}
    bns = {p: m for p, m in model.named_modules() if p and _is_bn(m)}
    for path, bn in bns.items():
        scale, shift = (entries.take(f"{path}.{s}", (torch.float16,), bn.running_mean.shape)
                        for s in ("bn_scale", "bn_shift"))
        state.update((f"{path}.{a}", t) for a, t in bn_from_affine(scale, shift, bn.eps).items())
    for key, target in model.state_dict().items():
        if _owner(key, bns) is None:
            stored = key[:-len("latent_weight")] + "weight" if key.endswith(".latent_weight") else key
            state[key] = decode_tensor(entries, stored, target)
    entries.check_all_taken()
    return state


def build_model(meta: dict) -> nn.Module:
    """An ordinary Ultralytics model built from the metadata's architecture yaml (random weights)."""
    from ultralytics.nn import tasks

    cls = meta.get("model_class")
    if cls not in SUPPORTED_MODEL_CLASSES:
        raise PackError(f"packed model class {cls!r} is not supported ({', '.join(SUPPORTED_MODEL_CLASSES)})")
    if not isinstance(meta.get("yaml"), dict):
        raise PackError("metadata has no architecture yaml")
    try:
        model = getattr(tasks, cls)(copy.deepcopy(meta["yaml"]), nc=meta.get("nc"), verbose=False)
    except Exception as e:  # noqa: BLE001
        raise PackError(f"cannot build the model from the metadata's yaml: {type(e).__name__}: {e}") from e
    return model


@dataclass(frozen=True)
class PackedBitLinearConfig:
    """quantize_ config of a packed BitLinear record: a conv becomes a PackedBitLinear with these settings."""

    spec: QuantSpec
    norm_eps: float

    @classmethod
    def from_record(cls, path: str, rec) -> "PackedBitLinearConfig":
        if not isinstance(rec, dict) or rec.get("kind") != "bitlinear":
            raise PackError(f"metadata module '{path}': only BitLinear replacements of a conv are supported")
        try:
            spec = QuantSpec("bitlinear_ttq", act_bits=int(rec["act_bits"]), act_per_token=bool(rec["per_token"]),
                             restore_token_stats=bool(rec["restore_token_stats"]))
            return cls(spec, float(rec["norm_eps"]))
        except (KeyError, TypeError, ValueError) as e:  # SpecError is a ValueError
            raise PackError(f"metadata module '{path}' has bad settings {rec!r}: {e}") from e


def _build_packed_bitlinear(conv: nn.Module, config: PackedBitLinearConfig) -> PackedBitLinear:
    if type(conv) is not nn.Conv2d:
        raise PackError(f"a packed BitLinear record names a {type(conv).__name__}, not a plain conv")
    q = PackedBitLinear(conv, config.spec)
    q.norm.eps = config.norm_eps
    return q


register_builder(PackedBitLinearConfig, _build_packed_bitlinear)


def install_packed_modules(model: nn.Module, records: dict) -> list[str]:
    """Put a PackedBitLinear (through quantize_) at every path the metadata's `modules` names, in place of the
    plain conv the yaml built there. Returns the paths."""
    if not isinstance(records, dict):
        raise PackError("metadata 'modules' must map module paths to their settings")
    by_config: dict[PackedBitLinearConfig, list[str]] = {}
    for path, rec in records.items():
        by_config.setdefault(PackedBitLinearConfig.from_record(path, rec), []).append(path)
    done = [p for config, paths in by_config.items() for p in quantize_(model, config, paths_filter(paths))]
    missing = sorted(set(records) - set(done))
    if missing:
        raise PackError(f"metadata names module '{missing[0]}', which the model built from the yaml lacks")
    return done


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild an ordinary Ultralytics model (float32, eval mode) from a packed file."""
    tensors, meta = read_packed(path)
    return model_from_packed(tensors, meta, source=str(path))


def model_from_packed(tensors: dict[str, torch.Tensor], meta: dict, source: str = "packed file") -> nn.Module:
    """The model a packed file describes (float32, eval mode); PackError for anything inconsistent."""
    model = build_model(meta)
    install_packed_modules(model, meta.get("modules") or {})
    try:
        state = decode_state(tensors, model)
    except PackError as e:
        raise PackError(f"{source}: {e}") from e
    model.load_state_dict(state, strict=False)
    try:
        model.names = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
        if meta.get("stride"):
            model.stride = torch.tensor(meta["stride"], dtype=torch.float32).reshape(-1)
            if hasattr(model.model[-1], "stride"):
                model.model[-1].stride = model.stride
    except (TypeError, ValueError, AttributeError) as e:
        raise PackError(f"{source}: metadata 'names' or 'stride' is malformed: {e}") from e
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
