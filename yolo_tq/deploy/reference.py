"""A measured reference for the pipeline report: Ultralytics' own INT8 export of the FP model (OpenVINO, weights and
activations quantized by NNCF, calibrated on the train split of --data), its size on disk and its mAP from
Ultralytics' validator. Without the deploy extras (OpenVINO + NNCF) nothing is exported and the JSON says why.

  yolo-tq int8-reference --weights yolo11n.pt --data coco128.yaml --imgsz 320 \\
      --workdir RUN_DIR/int8_reference --json RUN_DIR/results/int8_reference.json

Validation: an export has a fixed input shape, so Ultralytics' validator runs it with batch 1 and without
rectangular batches; the FP model is validated here the same way, so the two mAPs compare like for like.
"""

from __future__ import annotations

from pathlib import Path

from ..eval.validate import BOX_METRICS

FORMAT = "openvino-int8"
VALIDATION = "batch 1 and rect=False, as Ultralytics runs a fixed-shape export"


def unavailable(data: str) -> str | None:
    """Why Ultralytics' OpenVINO INT8 export cannot run here (one line), or None."""
    from . import backends

    return backends.availability(backends.target(FORMAT), "cpu", False, True, data)


def folder_bytes(path: Path) -> int:
    """Bytes on disk of an export: the file, or every file in its folder (IR .xml + .bin, metadata.yaml)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _accuracy(acc) -> dict:
    """An Accuracy under the validation metric names (eval.validate.BOX_METRICS)."""
    return dict(zip(BOX_METRICS, (acc.precision, acc.recall, acc.map50, acc.map50_95)))


def int8_reference(weights: str, data: str, imgsz: int, workdir: Path, log=print) -> dict:
    """Export `weights` with Ultralytics' OpenVINO INT8 export, validate it and the FP model alike; returns the
    record the report reads: status ok | skipped | failed, with the reason when not ok."""
    from .bench import validate_artifact
    from .export import ExportError, export_artifact, prepare_checkpoint

    head = {"format": FORMAT, "weights": str(weights), "data": str(data), "imgsz": imgsz}
    why = unavailable(data)
    if why:
        log(f"int8 reference skipped: {why}")
        return {**head, "status": "skipped", "reason": why}
    workdir = Path(workdir).resolve()
    pm = prepare_checkpoint(weights, workdir, "baseline")
    try:
        path, export_s = export_artifact(pm, FORMAT, workdir, imgsz, 1, data, "train")
    except ExportError as e:
        log(f"int8 reference failed: {e}")
        return {**head, "status": "failed", "reason": str(e)}
    size = folder_bytes(path)
    log(f"int8 reference: {path} ({size / 1e6:.2f} MB, exported in {export_s:.0f} s); validating")
    int8 = validate_artifact(path, data, imgsz, 1, "cpu", workdir / "val_int8")
    fp = validate_artifact(pm.checkpoint, data, imgsz, 1, "cpu", workdir / "val_fp")
    log(f"int8 reference: mAP50-95 {int8.map50_95:.4f} (FP model, same validation: {fp.map50_95:.4f})")
    return {**head, "status": "ok", "artifact": str(path), "bytes": size, "export_s": export_s,
            "calibration": "train split of the data yaml", "validation": VALIDATION,
            **_accuracy(int8), "fp_same_validation": _accuracy(fp)}
