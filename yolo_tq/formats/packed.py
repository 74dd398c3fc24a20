"""Packed ternary format: a real on-disk encoding of a ternary YOLO model, and the loader that undoes it.

One file, safetensors (no pickle), holding a few flat blobs and JSON metadata under the header key `yolo_tq`:

  ternary.codes   uint8    ternary weights as base-3 codes, 5 per byte (1.6 bits each); 0 -> 0, 1 -> +Wp, 2 -> -Wn;
                           each tensor padded to a whole byte
  ternary.scales  float32  (Wp, Wn) per ternary tensor
  int8.values     int8     other weights (ndim >= 2), symmetric per output channel, codes in [-127, 127]
  int8.scales     float16  a scale per output channel
  int8.scales32   float32  the same for a tensor tagged int8_fp32scale (a scale would overflow FP16 or be subnormal)
  fp16.values     float16  everything else: biases, BatchNorm as a per-channel affine pair (see below), the
                           DFL projection (a fixed 0..15 ramp that INT8 would not keep exact), and, with
                           rest="fp16", the other weights too
  raw.<key>       any      non-float tensors other than BatchNorm's num_batches_tracked (kept as they are)

The metadata lists every stored tensor in blob order as [name, precision, shape] (precision: ternary | int8 |
int8_fp32scale | fp16 | bn_affine_fp16 | raw), plus the architecture yaml, class names, stride and which yaml layers hold ternary
tensors. A new kind of tensor is a new precision tag and its decoder, without touching the others.

BitLinear layers (BitLinear_TTQ, standard BitLinear in C2PSA) are stored as their ternary weight (codes + Ap/An,
or β twice), bias, LayerNorm weight/bias and out_scale in FP16, and a record under `modules` (path -> act_bits,
per_token, restore_token_stats, LayerNorm eps); their training state (latent weight, threshold) is not stored.
The loader puts a PackedBitLinear (fixed ternary weight, BitLinear's activation path) at those paths.
TTQConv2d training modules are not packed directly: pack the stock ternary export (plain convs).

BatchNorm is not folded into the convs: folding multiplies each output channel by its own factor, so a ternary
conv would stop being {-Wn, 0, +Wp}. Instead each BN is stored as y = x*scale + shift (two FP16 vectors instead of
four) and restored as weight=scale, bias=shift, running_mean=0, running_var=1-eps, which computes the same
function in eval mode. The file is an inference artifact: fine-tune from the .pt, not from an unpacked model.

The loader rebuilds an ordinary Ultralytics model from the yaml (plus PackedBitLinear layers where the metadata
names them) and loads the decoded tensors: no training code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError
from .bitlinear_base import BitConv2dBase

FORMAT_NAME = "yolo-tq-packed"
FORMAT_VERSION = 1
META_KEY = "yolo_tq"
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
REST_PRECISIONS = ("int8", "fp16")
SUPPORTED_MODEL_CLASSES = ("DetectionModel",)
_POW3 = torch.tensor([3**i for i in range(TRITS_PER_BYTE)], dtype=torch.int16)
_BLOBS = ("ternary.codes", "ternary.scales", "int8.values", "int8.scales", "int8.scales32", "fp16.values")


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
    """The project's rule (shadow_weight_manager.ternary_values), after a cheap reject: a tensor whose first 64
    values already hold more than three distinct ones is not ternary, so it need not be sorted whole."""
    from .shadow_weight_manager import ternary_values

    if torch.unique(w.detach().reshape(-1)[:64]).numel() > 3:
        return False
    return ternary_values(w) is not None


def is_bitlinear(m: nn.Module) -> bool:
    """A BitLinear convolution of this project (BitLinear_TTQ, standard BitLinear, or a PackedBitLinear)."""
    return isinstance(m, BitConv2dBase)


class PackedBitLinear(BitConv2dBase):
    """A BitLinear convolution rebuilt from a packed file: the ternary weight is fixed (held in `latent_weight`; no
    scales, no threshold), the activation path is BitLinear's (LayerNorm, 8-bit absmax codes; bitlinear_base)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.latent_weight


def _module_of(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _inside_dfl(path: str, modules: dict[str, nn.Module]) -> bool:
    """Inside Ultralytics' DFL, whose conv is a fixed 0..15 projection (kept FP16, where it is exact)."""
    parts = path.split(".")
    return any(type(modules.get(".".join(parts[:i]))).__name__ == "DFL" for i in range(1, len(parts) + 1))


def _to_fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    h = t.detach().float().half()
    if not torch.isfinite(h).all() and torch.isfinite(t).all():
        raise PackError(f"{name} has values beyond the FP16 range")
    return h.reshape(-1)


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
    from .shadow_weight_manager import is_quantized

    odd = [f"{p} ({type(m).__name__})" for p, m in model.named_modules() if is_quantized(m) and not is_bitlinear(m)]
    if odd:
        raise PackError(f"the model still holds quantized training modules: {', '.join(odd[:3])}"
                        f"{' ...' if len(odd) > 3 else ''}; pack its stock ternary export instead")


def pack_state(model: nn.Module, rest: str = "int8", source: str | None = None,
               require_ternary: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(safetensors tensors, metadata) of an ordinary Ultralytics model whose ternary layers hold three values."""
    if rest not in REST_PRECISIONS:
        raise PackError(f"unknown precision {rest!r} for the non-ternary weights; valid: {', '.join(REST_PRECISIONS)}")
    check_packable(model)
    modules = _module_of(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    entries: list[list] = []
    blobs: dict[str, list[torch.Tensor]] = {k: [] for k in _BLOBS}
    raw: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    bitlinear = {p: m for p, m in modules.items() if is_bitlinear(m)}
    bitlinear_meta: dict[str, dict] = {}
    for key, t in state.items():
        if key in done:
            continue
        owner_path, _, attr = key.rpartition(".")
        owner = modules.get(owner_path)
        bl_path = next((p for p in bitlinear if key.startswith(p + ".")), None)
        if bl_path is not None:  # a BitLinear layer: its ternary weight, bias, LayerNorm, out_scale; no training state
            m = bitlinear[bl_path]
            w = m.weight.detach().cpu()
            if not is_ternary_tensor(w):
                raise PackError(f"{bl_path} ({type(m).__name__}) has a weight that is not ternary")
            codes, wp, wn = ternary_codes(w)
            blobs["ternary.codes"].append(pack_trits(codes))
            blobs["ternary.scales"].append(torch.tensor([wp, wn], dtype=torch.float32))
            entries.append([f"{bl_path}.weight", "ternary", list(w.shape)])
            for sub in ("bias", "norm.weight", "norm.bias", "out_scale"):
                if f"{bl_path}.{sub}" in state:
                    blobs["fp16.values"].append(_to_fp16(state[f"{bl_path}.{sub}"], f"{bl_path}.{sub}"))
                    entries.append([f"{bl_path}.{sub}", "fp16", list(state[f"{bl_path}.{sub}"].shape)])
            bitlinear_meta[bl_path] = {"kind": "bitlinear", "source_class": type(m).__name__,
                                       "act_bits": int(m.act_bits), "per_token": bool(m.per_token),
                                       "restore_token_stats": bool(m.restore_token_stats),
                                       "norm_eps": float(m.norm.eps)}
            done.update(k for k in state if k.startswith(bl_path + "."))
            continue
        if isinstance(owner, nn.modules.batchnorm._BatchNorm) and attr in ("weight", "bias", "running_mean",
                                                                           "running_var", "num_batches_tracked"):
            bn = [state.get(f"{owner_path}.{a}") for a in ("weight", "bias", "running_mean", "running_var")]
            if any(t is None for t in bn):
                raise PackError(f"{owner_path}: BatchNorm without running statistics or affine parameters")
            scale, shift = bn_affine(*bn, owner.eps)
            blobs["fp16.values"].append(torch.cat([_to_fp16(scale, owner_path), _to_fp16(shift, owner_path)]))
            entries.append([owner_path, "bn_affine_fp16", [int(scale.numel())]])
            done.update(f"{owner_path}.{a}" for a in ("weight", "bias", "running_mean", "running_var",
                                                       "num_batches_tracked"))
            continue
        done.add(key)
        if not t.is_floating_point():
            raw[f"raw.{key}"] = t.clone().contiguous()
            entries.append([key, "raw", list(t.shape)])
            continue
        weight_like = attr == "weight" and t.dim() >= 2 and not _inside_dfl(owner_path, modules)
        if weight_like and is_ternary_tensor(t):
            codes, wp, wn = ternary_codes(t)
            blobs["ternary.codes"].append(pack_trits(codes))
            blobs["ternary.scales"].append(torch.tensor([wp, wn], dtype=torch.float32))
            entries.append([key, "ternary", list(t.shape)])
        elif weight_like and rest == "int8":
            try:
                q, s = quantize_int8_per_channel(t, torch.float16)
                blobs["int8.scales"].append(s)
                entries.append([key, "int8", list(t.shape)])
            except ValueError:  # a channel's scale does not fit FP16: this tensor keeps FP32 scales
                q, s = quantize_int8_per_channel(t, torch.float32)
                blobs["int8.scales32"].append(s)
                entries.append([key, "int8_fp32scale", list(t.shape)])
            blobs["int8.values"].append(q.reshape(-1))
        else:
            blobs["fp16.values"].append(_to_fp16(t, key))
            entries.append([key, "fp16", list(t.shape)])
    n_tern = sum(e[1] == "ternary" for e in entries)
    if require_ternary and n_tern == 0:
        raise PackError("no ternary weights found (judged from the weights): this is not a ternary model")
    empty = {"ternary.codes": torch.uint8, "ternary.scales": torch.float32, "int8.values": torch.int8,
             "int8.scales": torch.float16, "int8.scales32": torch.float32, "fp16.values": torch.float16}
    tensors = {k: (torch.cat(v) if v else torch.zeros(0, dtype=empty[k])).contiguous() for k, v in blobs.items()}
    tensors["ternary.scales"] = tensors["ternary.scales"].reshape(-1, 2)
    tensors.update(raw)
    stride = getattr(model, "stride", None)
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_class": type(model).__name__,
        "task": "detect", "yaml": model.yaml, "nc": int(model.yaml.get("nc", len(getattr(model, "names", {})))),
        "names": {str(k): v for k, v in dict(getattr(model, "names", {}) or {}).items()},
        "stride": [float(s) for s in stride] if stride is not None else None,
        "rest_precision": rest,
        "ternary_layers": sorted({_layer_of(e[0]) for e in entries if e[1] == "ternary"} - {None}),
        "codes": {"ternary": "base-3, 5 per byte, 0->0 1->+Wp 2->-Wn", "int8": "symmetric per output channel"},
        "modules": bitlinear_meta, "tensors": entries, "source": source,
    }
    return tensors, meta


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
    """Pack `model` and write the file atomically (temporary file in the same folder, then rename)."""
    return save_packed_bytes(pack_bytes(model, rest, source, require_ternary), path)


def save_packed_bytes(data: bytes, path: str | Path) -> Path:
    """Write packed bytes atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def _check_entries(entries) -> None:
    ok = isinstance(entries, list)
    for e in entries if ok else []:
        ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
              and isinstance(e[2], list) and all(isinstance(d, int) and d >= 0 for d in e[2])
              and (e[1] not in ("ternary", "int8", "int8_fp32scale") or len(e[2]) >= 2))
        if not ok:
            raise PackError(f"metadata entry {e!r} is not [name, precision, shape] (weights need >= 2 dims)")
    if not ok:
        raise PackError("metadata 'tensors' must be a list of [name, precision, shape]")


def _expected_sizes(entries: list) -> dict[str, int]:
    n = dict.fromkeys(_BLOBS, 0)
    for name, prec, shape in entries:
        numel = math.prod(shape)
        if prec == "ternary":
            n["ternary.codes"] += packed_trit_bytes(numel)
            n["ternary.scales"] += 2
        elif prec in ("int8", "int8_fp32scale"):
            n["int8.values"] += numel
            n["int8.scales" if prec == "int8" else "int8.scales32"] += shape[0]
        elif prec == "fp16":
            n["fp16.values"] += numel
        elif prec == "bn_affine_fp16":
            n["fp16.values"] += 2 * numel
        elif prec != "raw":
            raise PackError(f"metadata names an unknown precision {prec!r} for {name}")
    return n


def check_blobs(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Every blob present, of its dtype and of the size the metadata describes; no undescribed tensors."""
    entries = meta.get("tensors")
    _check_entries(entries)
    for blob, n in _expected_sizes(entries).items():
        if blob not in tensors:
            raise PackError(f"tensor '{blob}' is missing from the file")
        if tensors[blob].numel() != n:
            raise PackError(f"metadata does not match the tensors: '{blob}' holds {tensors[blob].numel()} values, "
                            f"the metadata describes {n}")
    dtypes = {"ternary.codes": (torch.uint8,), "ternary.scales": (torch.float32,), "int8.values": (torch.int8,),
              "int8.scales": (torch.float16,), "int8.scales32": (torch.float32,), "fp16.values": (torch.float16,)}
    for blob, allowed in dtypes.items():
        if tensors[blob].dtype not in allowed:
            raise PackError(f"tensor '{blob}' is {tensors[blob].dtype}, the format stores it as {allowed[0]}")
    extra = set(tensors) - set(_BLOBS) - {f"raw.{e[0]}" for e in entries if e[1] == "raw"}
    if extra:
        raise PackError(f"the file holds tensors the metadata does not describe: {sorted(extra)[:3]}")


def decode_state(tensors: dict[str, torch.Tensor], meta: dict, bn_eps: dict[str, float]) -> dict[str, torch.Tensor]:
    """State dict (float32 for float tensors) from the blobs, checking every size against the metadata."""
    check_blobs(tensors, meta)
    entries = meta["tensors"]
    pos = dict.fromkeys(_BLOBS, 0)

    def take(blob: str, n: int) -> torch.Tensor:
        t = tensors[blob].reshape(-1)[pos[blob]:pos[blob] + n]
        pos[blob] += n
        return t

    state: dict[str, torch.Tensor] = {}
    for name, prec, shape in entries:
        numel = math.prod(shape)
        if prec == "ternary":
            wp, wn = take("ternary.scales", 2).float().tolist()
            if wp < 0 or wn < 0 or not math.isfinite(wp) or not math.isfinite(wn):
                raise PackError(f"{name}: ternary scales must be finite and >= 0 (got {wp}, {wn})")
            codes = unpack_trits(take("ternary.codes", packed_trit_bytes(numel)), numel)
            state[name] = decode_ternary(codes, wp, wn, shape)
        elif prec in ("int8", "int8_fp32scale"):
            q = take("int8.values", numel).reshape(shape)
            state[name] = dequantize_int8(q, take("int8.scales" if prec == "int8" else "int8.scales32", shape[0]))
        elif prec == "fp16":
            state[name] = take("fp16.values", numel).float().reshape(shape)
        elif prec == "bn_affine_fp16":
            if name not in bn_eps:
                raise PackError(f"metadata names BatchNorm '{name}', which the rebuilt model does not have")
            scale, shift = take("fp16.values", numel), take("fp16.values", numel)
            for attr, t in bn_from_affine(scale, shift, bn_eps[name]).items():
                state[f"{name}.{attr}"] = t
        else:  # raw
            t = tensors[f"raw.{name}"]
            if list(t.shape) != list(shape):
                raise PackError(f"metadata does not match the tensors: raw.{name} has shape {list(t.shape)}, "
                                f"metadata says {shape}")
            state[name] = t
    return state


def build_model(meta: dict) -> nn.Module:
    """An ordinary Ultralytics model built from the metadata's architecture yaml (random weights)."""
    import copy

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


def install_packed_modules(model: nn.Module, records: dict) -> list[str]:
    """Put a PackedBitLinear at every path the metadata's `modules` names (in place of the plain conv the yaml
    built there). Returns the paths."""
    if not isinstance(records, dict):
        raise PackError("metadata 'modules' must map module paths to their settings")
    for path, rec in records.items():
        try:
            conv = model.get_submodule(path)
        except AttributeError as e:
            raise PackError(f"metadata names module '{path}', which the model built from the yaml lacks") from e
        if not isinstance(rec, dict) or rec.get("kind") != "bitlinear" or not isinstance(conv, nn.Conv2d):
            raise PackError(f"metadata module '{path}': only BitLinear replacements of a conv are supported")
        try:
            q = PackedBitLinear(conv, int(rec["act_bits"]), bool(rec["per_token"]), bool(rec["restore_token_stats"]))
            q.norm.eps = float(rec["norm_eps"])
        except (KeyError, TypeError, ValueError) as e:
            raise PackError(f"metadata module '{path}' has bad settings {rec!r}: {e}") from e
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    return list(records)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild an ordinary Ultralytics model (float32, eval mode) from a packed file."""
    tensors, meta = read_packed(path)
    return model_from_packed(tensors, meta, source=str(path))


def model_from_packed(tensors: dict[str, torch.Tensor], meta: dict, source: str = "packed file") -> nn.Module:
    """The model a packed file describes (float32, eval mode); PackError for anything inconsistent."""
    check_blobs(tensors, meta)  # cheap checks before building the model
    model = build_model(meta)
    bitlinear = install_packed_modules(model, meta.get("modules") or {})
    bn_eps = {p: m.eps for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    state = decode_state(tensors, meta, bn_eps)
    for path in bitlinear:  # a BitLinear layer keeps its fixed ternary weight in `latent_weight`
        if f"{path}.weight" in state:
            state[f"{path}.latent_weight"] = state.pop(f"{path}.weight")
    target = model.state_dict()
    optional = {k for k in target if k.endswith(".num_batches_tracked")}
    missing = sorted(set(target) - set(state) - optional)
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise PackError(f"{source}: metadata does not match the model built from its yaml "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, t in state.items():
        if tuple(t.shape) != tuple(target[k].shape):
            raise PackError(f"{source}: {k} has shape {tuple(t.shape)}, the model built from the yaml needs "
                            f"{tuple(target[k].shape)}")
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


def precisions(meta: dict) -> dict[str, str]:
    """Tensor (or BatchNorm module) name -> precision tag."""
    return {name: prec for name, prec, _ in meta["tensors"]}


class _TensorView:
    """name -> tensor of a model: its state dict, else a module attribute (a BitLinear's computed `weight`)."""

    def __init__(self, model: nn.Module):
        self.model, self.state = model, model.state_dict()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.state:
            return self.state[name]
        path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(path), attr).detach()


@torch.no_grad()
def verify_round_trip(source: nn.Module, unpacked: nn.Module, meta: dict) -> dict:
    """Compare an unpacked model with the model it was packed from, tensor by tensor: ternary tensors must be
    equal, INT8 ones within half a quantization step (per output channel), FP16 ones within FP16 rounding; each
    BatchNorm is compared as the affine map it computes in eval mode. Returns counts and worst errors."""
    src, out = _TensorView(source), _TensorView(unpacked)
    mods_src, mods_out = _module_of(source), _module_of(unpacked)
    rep = {"ternary": 0, "ternary_identical": 0, "int8": 0, "int8_max_err_steps": 0.0, "fp16": 0,
           "fp16_max_rel_err": 0.0, "bn": 0, "bn_max_rel_err": 0.0}

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)) if a.numel() else 0.0

    for name, prec, _ in meta["tensors"]:
        if prec == "ternary":
            rep["ternary"] += 1
            rep["ternary_identical"] += int(torch.equal(src[name].float(), out[name].float()))
        elif prec in ("int8", "int8_fp32scale"):
            rep["int8"] += 1
            _, scale = quantize_int8_per_channel(src[name], torch.float32)
            err = (src[name].float() - out[name].float()).reshape(scale.numel(), -1).abs().amax(1)
            steps = err / scale.clamp_min(1e-30)
            rep["int8_max_err_steps"] = max(rep["int8_max_err_steps"], float(steps.max()) if steps.numel() else 0.0)
        elif prec == "fp16":
            rep["fp16"] += 1
            rep["fp16_max_rel_err"] = max(rep["fp16_max_rel_err"], rel(out[name], src[name]))
        elif prec == "bn_affine_fp16":
            rep["bn"] += 1
            a, b = mods_src[name], mods_out[name]
            sa, ta = bn_affine(a.weight, a.bias, a.running_mean, a.running_var, a.eps)
            sb, tb = bn_affine(b.weight, b.bias, b.running_mean, b.running_var, b.eps)
            rep["bn_max_rel_err"] = max(rep["bn_max_rel_err"], rel(sb, sa), rel(tb, ta))
    rep["ok"] = rep["ternary_identical"] == rep["ternary"] and rep["int8_max_err_steps"] <= 0.5 + 1e-3
    return rep


def unpack_to_checkpoint(packed: str | Path, out: str | Path) -> Path:
    """Write the unpacked model as an ordinary Ultralytics .pt (FP16 pickle, as Ultralytics saves weights), so
    that `ultralytics.YOLO(out)` and the project's validate() can use it."""
    from ..checkpoints import save_stock_checkpoint

    model = load_packed(packed)
    return save_stock_checkpoint(model, out, extra={"packed_source": str(packed)})
