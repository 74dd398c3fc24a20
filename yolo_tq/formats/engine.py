"""Ultralytics' .engine container for a TensorRT engine built from an ONNX file: a 4-byte little-endian length, the
ONNX file's Ultralytics metadata as JSON, then the serialized engine, so that `ultralytics.YOLO(path)` runs it."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_bytes
from ..machine import importable

INT_METADATA = ("stride", "batch")  # metadata values Ultralytics reads back as ints


def tensorrt_available() -> bool:
    return importable("tensorrt")


def engine_container(metadata: dict[str, str], engine: bytes) -> bytes:
    """The bytes of an Ultralytics .engine file holding `engine` with `metadata` (ONNX metadata_props)."""
    meta = {k: int(v) if k in INT_METADATA else v for k, v in metadata.items()}
    header = json.dumps(meta).encode()
    return len(header).to_bytes(4, "little", signed=True) + header + bytes(engine)


def build_tensorrt_engine(onnx_path: str | Path, out: str | Path, fp16: bool = True) -> tuple[bool, str]:
    """A TensorRT engine of an ONNX file (the deployable ONNX), written as an Ultralytics .engine; (built, one line:
    the file or TensorRT's refusal)."""
    import onnx
    import tensorrt as trt

    model_bytes = Path(onnx_path).read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no reason given"
        return False, f"TensorRT {trt.__version__} refused the ONNX: {' '.join(errors.split())}"
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return False, f"TensorRT {trt.__version__} parsed the ONNX but built no engine (see its log above)"
    meta = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props if p.key != "yolo_tq"}
    atomic_write_bytes(out, engine_container(meta, engine))
    return True, f"TensorRT {trt.__version__} engine ({'FP16' if fp16 else 'FP32'}): {out}"
