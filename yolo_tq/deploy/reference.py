"""The pipeline report's measured reference: Ultralytics' own OpenVINO INT8 export of the FP model (NNCF, calibrated
on the train split of --data), its size on disk and its mAP, with the FP model validated the same way (batch 1,
square letterboxes, as Ultralytics runs a fixed-shape export). Without OpenVINO + NNCF the JSON says why not.

  yolo-tq int8-reference --weights yolo11n.pt --data coco128.yaml --imgsz 320 \\
      --workdir RUN_DIR/int8_reference --json RUN_DIR/results/int8_reference.json
"""

from __future__ import annotations

from pathlib import Path

from ..eval.validate import BOX_METRICS, validate

FORMAT = "openvino-int8"
VALIDATION = "batch 1 and rect=False, as Ultralytics runs a fixed-shape export"


def unavailable(data: str) -> str | None:
    """Why Ultralytics' OpenVINO INT8 export cannot run here (one line), or None."""
    from .backends import target
    from .bench import BenchOptions

    return target(FORMAT).skip_reason(BenchOptions("", device="cpu", export_int8=True, data=data))


def int8_reference(weights: str, data: str, imgsz: int, workdir: Path, log=print) -> dict:
    """The report's record: status ok | skipped | failed (with the reason when not ok)."""
    from .deployable import ExportError, export_artifact, prepare_checkpoint
    from .measure import file_bytes

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
    size = file_bytes(path)
    log(f"int8 reference: {path} ({size / 1e6:.2f} MB, exported in {export_s:.0f} s); validating")
    def val(model: Path, name: str) -> dict:  # the same validation for both
        m = validate(model, data, imgsz, 1, "cpu", project=str(workdir / name), rect=False, log=workdir / name / "val.log")
        return {k: m[k] for k in BOX_METRICS}

    int8, fp = val(path, "val_int8"), val(pm.checkpoint, "val_fp")
    log(f"int8 reference: mAP50-95 {int8['mAP50-95']:.4f} (FP model, same validation: {fp['mAP50-95']:.4f})")
    return {**head, "status": "ok", "artifact": str(path), "bytes": size, "export_s": export_s,
            "calibration": "train split of the data yaml", "validation": VALIDATION, **int8, "fp_same_validation": fp}
