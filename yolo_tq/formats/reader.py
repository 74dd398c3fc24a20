"""Reading a packed file: the metadata checked, the model built from Ultralytics' own yaml, every tensor's dtype and
shape compared with what that model needs before any tensor is read, then decoded. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..io import input_problem
from ..quant.apply import paths_filter, quantize_, register_builder
from ..quant.layers import PackedBitLinear
from .codes import GRID_BITS, PackError, bn_from_affine, decode_grid, decode_ternary, dequantize_int8, unpack_bits, \
    unpack_trits
from .layout import batchnorms, owner_path, stored_key, check_layout, expected_layout
from .metadata import META_KEY, PackedBitLinearConfig, short_repr, check_metadata

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
FP16_MAX = torch.finfo(torch.float16).max  # every decoded value must fit: the unpacked model is saved in FP16


def _parse_metadata(header: dict | None) -> dict:
    if not header or META_KEY not in header:
        raise PackError(f"a safetensors file but not a packed YOLO-TQ model (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, ints beyond Python's digit limit, deep nesting
        raise PackError(f"metadata is not valid JSON: {short_repr(str(e), 200)}") from e
    check_metadata(meta)
    return meta


def open_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, nn.Module]:
    """(tensors, metadata, the model the metadata describes with its BitLinear layers, random weights). Order: the
    metadata is checked, the model built from the known yaml, every tensor's dtype and shape compared, from the
    safetensors header, with what that model needs; only then is any tensor read. Nothing is unpickled."""
    from safetensors import safe_open

    p = Path(path)
    problem = input_problem(p)
    if problem == "not found":
        raise FileNotFoundError(f"packed file not found: {p}")
    if problem:
        raise PackError(f"packed file {problem}: {p}")
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
                        f"{short_repr(str(e), 300)}") from e
    return tensors, meta, model


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a packed file, every tensor checked against the model the metadata describes
    before it is read (see open_packed)."""
    tensors, meta, _ = open_packed(path)
    return tensors, meta


def decode_tensor(tensors: dict[str, torch.Tensor], key: str, target: torch.Tensor) -> torch.Tensor:
    """The tensor stored for state key `key`, decoded to the dtype and shape of `target` (float32 for floats);
    the layout has been checked (check_layout)."""
    if f"{key}.codes" in tensors:
        wp, wn = tensors[f"{key}.scales"].tolist()
        if not (0 <= wp <= FP16_MAX and 0 <= wn <= FP16_MAX):  # NaN fails too
            raise PackError(f"{key}: ternary scales must be finite and >= 0, within FP16's range (at most "
                            f"{FP16_MAX:g}, as the model is saved), got {wp}, {wn}")
        codes = unpack_trits(tensors[f"{key}.codes"], target.numel())
        return decode_ternary(codes, wp, wn, target.shape)
    for b in GRID_BITS:
        if f"{key}.grid{b}" in tensors and target.dim() >= 2:
            steps = tensors[f"{key}.steps"]
            if not ((steps >= 0).all() and (steps <= FP16_MAX).all()):
                raise PackError(f"{key}: grid steps must be finite, >= 0 and within FP16's range")
            return decode_grid(unpack_bits(tensors[f"{key}.grid{b}"], target.numel(), b).reshape(target.shape), steps)
    if f"{key}.int8" in tensors and target.dim() >= 2:
        return dequantize_int8(tensors[f"{key}.int8"], tensors[f"{key}.scale"])
    return tensors[key].float() if target.is_floating_point() else tensors[key]


def decode_state(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` (built from the metadata, BitLinear layers installed) decoded from the file's
    tensors, whose names, dtypes and shapes the caller has checked (check_layout); BatchNorm comes from its affine
    pair. PackError if a decoded tensor holds NaN or Inf."""
    bns, state = batchnorms(model), {}
    for path, bn in bns.items():
        pair = (tensors[f"{path}.bn_scale"], tensors[f"{path}.bn_shift"])
        state.update((f"{path}.{a}", t) for a, t in bn_from_affine(*pair, bn.eps).items())
    for key, target in model.state_dict().items():
        if owner_path(key, bns) is None:
            state[key] = decode_tensor(tensors, stored_key(key), target)
    _check_finite(state, "decodes to")
    return state


def _check_finite(tensors: dict[str, torch.Tensor], what: str = "holds") -> None:
    """PackError naming the first float tensor with NaN or Inf, or with values beyond FP16's range: the model is
    saved in FP16 (Ultralytics' format), where they would become Inf."""
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not (t.abs() <= FP16_MAX).all()), None)
    if bad:
        raise PackError(f"tensor '{bad}' {what} NaN or Inf values, or values beyond FP16's range (|x| > "
                        f"{FP16_MAX:g}; corrupt file)")


def build_model(meta: dict) -> nn.Module:
    """The Ultralytics model the metadata describes (random weights), built from Ultralytics' own YOLO11 yaml
    that the metadata's yaml equals (check_metadata), never from the file's yaml; its stride must match."""
    from ultralytics.nn.tasks import DetectionModel

    ref = check_metadata(meta)
    model = DetectionModel(ref, nc=ref["nc"], verbose=False)
    stride = meta.get("stride")
    if stride is not None and [float(s) for s in stride] != model.stride.tolist():
        raise PackError(f"metadata stride {short_repr(stride)} does not match the architecture's "
                        f"{model.stride.tolist()}")
    model.names = {int(k): v for k, v in meta["names"].items()}
    return model


def skeleton_model(meta: dict) -> nn.Module:
    """build_model with the metadata's BitLinear layers installed: the model the file's tensors must fit."""
    model = build_model(meta)
    install_packed_modules(model, meta.get("modules", {}))
    return model


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
            raise PackError(f"metadata names module {short_repr(path)}, which is not a C2PSA conv of the model built "
                            f"from the yaml (BitLinear layers are only loaded there)")
        by_config.setdefault(config, []).append(path)
    return [p for config, paths in by_config.items() for p in quantize_(model, config, paths_filter(paths))]


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild an ordinary Ultralytics model (float32, eval mode) from a packed file."""
    tensors, meta, model = open_packed(path)
    return fill_model(model, tensors, str(path))


def model_from_packed(tensors: dict[str, torch.Tensor], meta: dict, source: str = "packed file") -> nn.Module:
    """The model a packed file's (tensors, metadata) describe (float32, eval mode); PackError for anything wrong."""
    try:
        model = skeleton_model(meta)
        check_layout(expected_layout(model, set(tensors)), {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    except PackError as e:
        raise PackError(f"{source}: {e}") from e
    return fill_model(model, tensors, source)


def fill_model(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """`model` (a skeleton_model) with the decoded weights, float32, eval mode."""
    try:
        state = decode_state(tensors, model)
    except PackError as e:
        raise PackError(f"{source}: {e}") from e
    model.load_state_dict(state, strict=False)
    return model.float().eval()


def unpack_to_checkpoint(packed: str | Path, out: str | Path) -> Path:
    """Write the unpacked model as an ordinary Ultralytics .pt (FP16 pickle, as Ultralytics saves weights), so
    that `ultralytics.YOLO(out)` and the project's validate() can use it."""
    from ..io import save_stock_checkpoint

    model = load_packed(packed)
    return save_stock_checkpoint(model, out, extra={"packed_source": str(packed)})
