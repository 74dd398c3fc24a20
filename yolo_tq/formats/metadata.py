"""The packed file's metadata: its format constants and the checks a file's metadata must pass before anything is
built from it (the stored yaml must be Ultralytics' own YOLO11 yaml; every field has a fixed type; BitLinear records
are validated here, as PackedBitLinearConfig)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..io import MODEL_SIZES
from ..quant.spec import QuantSpec
from .codes import PackError

FORMAT_NAME = "yolo-tq-packed"
FORMAT_VERSION = 2  # 1: concatenated blobs indexed by a JSON list; 2: one safetensors tensor per entry
META_KEY = "yolo_tq"
REST_PRECISIONS = ("int8", "fp16")
SUPPORTED_MODEL_CLASSES = ("DetectionModel",)
# what a file may describe (the loader builds nothing else; see check_metadata)
MAX_NC, MAX_NAME = 10_000, 256  # classes, characters of a class name
YAML_UNCOMPARED = ("nc", "yaml_file", "channels", "ch")  # nc is bounded, channels must be 3, yaml_file is unused
METADATA_KEYS = ("format", "format_version", "model_class", "task", "yaml", "nc", "names", "stride",
                 "rest_precision", "ternary_layers", "codes", "modules", "source")
RECORD_FIELDS = ("kind", "source_class", "act_bits", "per_token", "restore_token_stats", "norm_eps")
BITLINEAR_CLASSES = ("BitLinear_TTQ", "BitLinear_Standard", "PackedBitLinear")
_ABSENT = object()


def short_repr(value, limit: int = 70) -> str:
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
    return f"{where} is {short_repr(got)}, Ultralytics' has {short_repr(want)}"


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
        raise PackError(f"architecture scale {short_repr(scale)} is not a YOLO11 scale ({', '.join(MODEL_SIZES)}): "
                        f"only Ultralytics YOLO11 detection architectures are loaded")
    ref = reference_yaml(scale)
    for key in ("channels", "ch"):
        if yaml.get(key, 3) != 3:
            raise PackError(f"architecture yaml: {key} is {short_repr(yaml.get(key))}, YOLO11 takes 3 input channels")
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
        raise PackError(f"metadata nc is {short_repr(nc)}: the number of classes must be an integer in 1..{MAX_NC}")
    if meta["yaml"].get("nc", nc) != nc:
        raise PackError(f"metadata nc {nc} and the yaml's nc {short_repr(meta['yaml'].get('nc'))} differ")
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
        raise PackError(f"metadata stride {short_repr(stride)} is not a short list of positive numbers")
    if meta.get("rest_precision") not in REST_PRECISIONS:
        raise PackError(f"metadata rest_precision {short_repr(meta.get('rest_precision'))} is not one of "
                        f"{', '.join(REST_PRECISIONS)}")
    layers = meta.get("ternary_layers")
    if not isinstance(layers, list) or any(type(i) is not int or not 0 <= i < 1000 for i in layers):
        raise PackError(f"metadata ternary_layers {short_repr(layers)} is not a list of layer indices")
    if not isinstance(meta.get("source"), (str, type(None))) or len(meta.get("source") or "") > 4096:
        raise PackError("metadata 'source' must be a file name")
    codes = meta.get("codes", {})
    if not isinstance(codes, dict) or any(not isinstance(v, str) or len(v) > 200 for v in codes.values()):
        raise PackError("metadata 'codes' must map kinds to short descriptions")


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
            raise PackError(f"metadata module {short_repr(path)}: bad settings {short_repr(rec, 200)}; a record holds "
                            f"{', '.join(RECORD_FIELDS)}, kind 'bitlinear', source_class one of "
                            f"{', '.join(BITLINEAR_CLASSES)}")
        problems = [f for f, ok in (
            ("act_bits", type(rec["act_bits"]) is int and 2 <= rec["act_bits"] <= 16),
            ("per_token", type(rec["per_token"]) is bool),
            ("restore_token_stats", type(rec["restore_token_stats"]) is bool),
            ("norm_eps", type(rec["norm_eps"]) in (int, float) and 0 < rec["norm_eps"] < 1)) if not ok]
        if problems:
            raise PackError(f"metadata module {short_repr(path)} has bad settings: {problems[0]} is "
                            f"{short_repr(rec[problems[0]])} (act_bits: an integer in 2..16, per_token and "
                            f"restore_token_stats: true/false, norm_eps: a number in (0, 1))")
        spec = QuantSpec("bitlinear_ttq", act_bits=rec["act_bits"], act_per_token=rec["per_token"],
                         restore_token_stats=rec["restore_token_stats"])
        return cls(spec, float(rec["norm_eps"]))


def check_metadata(meta) -> dict:
    """Validate a packed file's metadata without building anything; returns the reference yaml (with nc) that
    the model is built from. PackError names the first field that is wrong."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise PackError(f"metadata does not describe a {FORMAT_NAME} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackError(f"format version {short_repr(meta.get('format_version'))} is not supported "
                        f"(this code reads version {FORMAT_VERSION})")
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise PackError(f"metadata holds unknown fields {short_repr(unknown)}")
    if meta.get("model_class") not in SUPPORTED_MODEL_CLASSES or meta.get("task") != "detect":
        raise PackError(f"packed model class {short_repr(meta.get('model_class'))} (task {short_repr(meta.get('task'))}) "
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
