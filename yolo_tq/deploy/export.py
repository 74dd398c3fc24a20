"""Preparing a checkpoint for export and exporting it through Ultralytics' exporter (ONNX simplified with onnxslim,
OpenVINO FP32 / INT8 via NNCF, TensorRT FP16 / INT8)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..io import CheckpointError, atomic_write_bytes, load_model, save_stock_checkpoint
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
# that are not an Ultralytics export: deploy/deployable.py registers "onnx-deploy"
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
    """dst -> src as a symlink (a copy where links are not possible). Exports are written next to dst, never next to
    the user's file (which may be read-only, e.g. ../shared)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
    return dst


def prepare_checkpoint(path: str | Path, workdir: Path, role: str) -> PreparedModel:
    """Read a checkpoint and make the stock model the exporter takes. A training checkpoint holding quantized
    modules (TTQConv2d, BitLinear) is exported first (quant.apply.export_ternary: TTQ layers become plain
    convs holding their three values). summary["activation_rounding"]: BitLinear layers (8-bit activations) remain,
    so its exports are judged by detection agreement (agreement module docstring)."""
    from ..eval.layers import conv_rows, totals
    from .weights import deploy_weight_summary, single_thread

    src = Path(path)
    model, ckpt = load_model(src)
    workdir.mkdir(parents=True, exist_ok=True)
    dst = workdir / f"{role}.pt"
    q = quantized_modules(model)
    if q:
        exported = export_ternary(model)
        save_stock_checkpoint(exported, dst, train_args=ckpt.get("train_args"))
        model, kind = exported, "ttq-training"
    else:
        _link(src, dst)
        kind = "fp"
    with single_thread():
        rows = conv_rows(model)
        tot = totals(model, rows)
        deploy = deploy_weight_summary(model)
    if kind == "fp" and tot["ternary_convs"]:
        kind = "ternary"
    kept = quantized_modules(model).values()
    summary = {"quantized_modules_in_checkpoint": len(q),
               "quantized_modules_kept": sorted({type(m).__name__ for m in kept}),
               "activation_rounding": any(isinstance(m, BitConv2d) for m in kept), **tot, "deploy": deploy}
    return PreparedModel(role, src, dst, kind, summary)


@contextlib.contextmanager
def captured_output(logfile: Path, verbose: bool):
    """Send the exporters' chatter (Ultralytics, NNCF progress bars, native libraries: file descriptors 1 and 2) to
    an anonymous buffer, then append it to `logfile` through the atomic writer."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as buf, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            buf.seek(0)
            atomic_write_bytes(logfile, (logfile.read_bytes() if logfile.is_file() else b"") + buf.read())


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
    from ultralytics.utils import LOGGER

    folder = workdir / key
    ckpt = _link(prepared.checkpoint.resolve(), folder / f"{prepared.role}.pt")
    kwargs = dict(args, imgsz=imgsz, batch=batch, device=0 if args["format"] == "engine" else "cpu")
    if args.get("quantize") == 8:
        if not data:
            raise ExportError(f"{key} needs calibration images (--data)")
        kwargs.update(data=data, split=calib_split, fraction=fraction)
    log = workdir / "export.log"
    level = LOGGER.level
    t0 = time.perf_counter()
    try:
        with captured_output(log, verbose):
            if not verbose:
                LOGGER.setLevel(logging.WARNING)
                logging.getLogger("nncf").setLevel(logging.WARNING)
            out = YOLO(str(ckpt), task="detect").export(**kwargs)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one line for this target
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"{key} export failed: {type(e).__name__}: {msg} (log: {log})") from e
    finally:
        LOGGER.setLevel(level)
    path = Path(out[0] if isinstance(out, (list, tuple)) else out)
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not path.exists():
        raise ExportError(f"{key} export reported {path}, which does not exist (log: {log})")
    return path.resolve(), time.perf_counter() - t0


__all__ = ["ARTIFACTS", "CheckpointError", "ExportError", "PreparedModel", "captured_output", "export_artifact",
           "prepare_checkpoint"]
