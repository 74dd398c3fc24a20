"""Validation through Ultralytics' own validator, for FP and every checkpoint this project writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import check_dataset, check_device, dataset_errors
from ..io import CheckpointError, load_model, safe_loading


def validate(checkpoint: str | Path, data: str, imgsz: int = 640, batch: int = 16, device: str | None = None,
             split: str = "val", plots: bool = False, verbose: bool = False, project: str | None = None) -> dict:
    """mAP50, mAP50-95, precision and recall of a checkpoint on `data` (Ultralytics DetectionValidator)."""
    from ultralytics import YOLO

    load_model(checkpoint)  # one clear error for a missing or unreadable file
    check_dataset(data, (split,))
    check_device(device)
    try:
        with safe_loading():  # in safe mode Ultralytics' own load is weights_only too
            model = YOLO(str(checkpoint))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load {checkpoint} with Ultralytics: {e}") from e
    kwargs = dict(data=data, imgsz=imgsz, batch=batch, split=split, plots=plots, verbose=verbose)
    if device is not None:
        kwargs["device"] = device
    with tempfile.TemporaryDirectory(prefix="yolo_tq_val_") as tmp, dataset_errors(data):
        if project or not plots:  # without plots there is nothing to keep: Ultralytics' val-N folder goes to tmp
            kwargs["project"] = project or tmp
        m = model.val(**kwargs)
    p, r, map50, map5095 = m.box.mean_results()
    return {"checkpoint": str(checkpoint), "data": data, "imgsz": imgsz, "batch": batch, "split": split,
            "precision": float(p), "recall": float(r), "mAP50": float(map50), "mAP50-95": float(map5095)}
