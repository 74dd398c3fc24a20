"""Preparing a checkpoint for export and exporting it: through Ultralytics' exporter (ONNX simplified with onnxslim,
OpenVINO FP32 / INT8 via NNCF, TensorRT FP16 / INT8), or through an exporter an artifact registers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..eval.fused import deploy_weight_summary, single_thread
from ..eval.layers import conv_rows, totals
from ..eval.validate import captured_output
from ..io import atomic_write_bytes, load_model, save_stock_checkpoint
from ..quant.apply import export_ternary, quantized_modules
from ..quant.layers import BitConv2d

# artifact key -> Ultralytics export arguments (None: the checkpoint itself)
ARTIFACTS: dict[str, dict | None] = {
    "pt": None,
    "onnx": {"format": "onnx", "simplify": True},
    "onnx-deploy": {"format": "onnx-deploy"},  # deploy.deployable: the FP ONNX with its weights stored as codes
    "openvino": {"format": "openvino"},
    "openvino-int8": {"format": "openvino", "quantize": 8},
    "engine-fp16": {"format": "engine", "quantize": 16},
    "engine-int8": {"format": "engine", "quantize": 8},
}
# artifact key -> its own exporter (prepared, folder, imgsz, batch, data, verbose) -> (path, seconds), for artifacts
# that are not an Ultralytics export (bench registers deployable's "onnx-deploy")
EXPORTERS: dict = {}


def register_exporter(key: str, export) -> None:
    EXPORTERS[key] = export


class ExportError(RuntimeError):
    """An export that failed; the message is one line, the exporter's log is in the work folder."""


@dataclass
class PreparedModel:
    role: str  # baseline | quantized
    source: Path  # what the user passed
    checkpoint: Path  # an Ultralytics-loadable checkpoint in the work folder (symlink or re-saved export)
    kind: str  # fp | ternary | ttq-training
    summary: dict = field(default_factory=dict)


def _link(src: Path, dst: Path) -> Path:
    """dst -> src as a symlink (a copy where links are not possible): exports go next to dst, never next to the
    user's file (which may be read-only)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
    return dst


def prepare_checkpoint(path: str | Path, workdir: Path, role: str) -> PreparedModel:
    """The stock checkpoint the exporter takes: a training checkpoint's TTQ layers become plain convs holding their
    three values (export_ternary). summary["activation_rounding"]: BitLinear layers (8-bit activations) remain."""
    src = Path(path)
    model, ckpt = load_model(src)
    workdir.mkdir(parents=True, exist_ok=True)
    dst, q = workdir / f"{role}.pt", quantized_modules(model)
    if q:
        model, kind = export_ternary(model), "ttq-training"
        save_stock_checkpoint(model, dst, train_args=ckpt.get("train_args"))
    else:
        kind = "fp"
        _link(src, dst)
    with single_thread():
        tot, deploy = totals(model, conv_rows(model)), deploy_weight_summary(model)
    kept = quantized_modules(model).values()
    summary = {"quantized_modules_in_checkpoint": len(q),
               "quantized_modules_kept": sorted({type(m).__name__ for m in kept}),
               "activation_rounding": any(isinstance(m, BitConv2d) for m in kept), **tot, "deploy": deploy}
    return PreparedModel(role, src, dst, "ternary" if kind == "fp" and tot["ternary_convs"] else kind, summary)


def export_artifact(prepared: PreparedModel, key: str, workdir: Path, imgsz: int, batch: int, data: str | None = None,
                    calib_split: str = "train", fraction: float = 1.0, verbose: bool = False) -> tuple[Path, float]:
    """Export `prepared` to the artifact `key` in its own folder under workdir; returns (path, seconds)."""
    if key not in ARTIFACTS:
        raise ValueError(f"unknown artifact {key!r}; known: {', '.join(ARTIFACTS)}")
    args = ARTIFACTS[key]
    if args is None:
        return prepared.checkpoint, 0.0
    if key in EXPORTERS:
        return EXPORTERS[key](prepared, workdir / key, imgsz, batch, data, verbose)
    from ultralytics import YOLO

    ckpt = _link(prepared.checkpoint.resolve(), workdir / key / f"{prepared.role}.pt")
    kwargs = dict(args, imgsz=imgsz, batch=batch, device=0 if args["format"] == "engine" else "cpu")
    if args.get("quantize") == 8:
        if not data:
            raise ExportError(f"{key} needs calibration images (--data)")
        kwargs.update(data=data, split=calib_split, fraction=fraction)
    log, t0 = workdir / "export.log", time.perf_counter()
    try:
        with captured_output(None if verbose else log):
            out = YOLO(str(ckpt), task="detect").export(**kwargs)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one line for this target
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"{key} export failed: {type(e).__name__}: {msg} (log: {log})") from e
    path = Path(out[0] if isinstance(out, (list, tuple)) else out)
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not path.exists():
        raise ExportError(f"{key} export reported {path}, which does not exist (log: {log})")
    return path.resolve(), time.perf_counter() - t0
