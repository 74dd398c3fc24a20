"""Validation through Ultralytics' own validator, for FP and every checkpoint this project writes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, check_dataset, check_device, dataset_errors
from ..io import CheckpointError, atomic_write_bytes, load_model, safe_loading

EXPORTED = (".onnx", ".engine", "_openvino_model")  # exports Ultralytics' validator runs as they are

BOX_METRICS = ("precision", "recall", "mAP50", "mAP50-95")  # the order of Ultralytics' box.mean_results()


@dataclass(frozen=True)
class Accuracy:
    """The box metrics of one validation (the latency benchmark's mAP of an export)."""

    map50: float
    map50_95: float
    precision: float
    recall: float

    @classmethod
    def of(cls, metrics: dict) -> Accuracy:  # validate's metrics
        return cls(metrics["mAP50"], metrics["mAP50-95"], metrics["precision"], metrics["recall"])


def box_metrics(results) -> dict[str, float]:
    """precision, recall, mAP50 and mAP50-95 of an Ultralytics DetMetrics, under this project's names."""
    return dict(zip(BOX_METRICS, map(float, results.box.mean_results())))


def validate(checkpoint: str | Path, data: str, imgsz: int = 640, batch: int = 16, device: str | None = None,
             split: str = "val", plots: bool = False, verbose: bool = False, project: str | None = None,
             per_class: bool = False, rect: bool | None = None, log: str | Path | None = None) -> dict:
    """mAP50, mAP75, mAP50-95, precision and recall of a checkpoint on `data` (Ultralytics DetectionValidator);
    with `per_class`, also "per_class": one row per class that has labels in the split (class_rows). An export
    (.onnx, .engine, OpenVINO folder) is validated as stock Ultralytics runs it (an .onnx: batch 1 for its static
    input). `rect=False`: square letterboxes, as a fixed-shape export sees them; `log`: Ultralytics' output goes
    to that file instead of the screen."""
    from ultralytics import YOLO

    if str(checkpoint).endswith(".onnx"):
        batch = 1 if check_onnx_input(checkpoint, imgsz) else batch
    elif not str(checkpoint).endswith(EXPORTED):
        load_model(checkpoint)  # one clear error for a missing or unreadable file
    info = check_dataset(data, (split,))
    check_device(device)
    try:
        with safe_loading():  # in safe mode Ultralytics' own load is weights_only too
            model = YOLO(str(checkpoint), task="detect")
            model_nc = len(model.names)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load {checkpoint} with Ultralytics: {e}") from e
    check_class_count(checkpoint, model_nc, data, info.get("nc"))
    kwargs = dict(data=data, imgsz=imgsz, batch=batch, split=split, plots=plots, verbose=verbose)
    kwargs.update({k: v for k, v in (("device", device), ("rect", rect)) if v is not None})
    seen: dict = {}
    model.add_callback("on_val_start", lambda validator: seen.update(images_read(validator.dataloader.dataset)))
    with tempfile.TemporaryDirectory(prefix="yolo_tq_val_") as tmp, dataset_errors(data), captured_output(log):
        if project or not plots:  # without plots there is nothing to keep: Ultralytics' val-N folder goes to tmp
            kwargs["project"] = project or tmp
        m = model.val(**kwargs)
    out = {"checkpoint": str(checkpoint), "data": data, "imgsz": imgsz, "batch": batch, "split": split,
           **box_metrics(m), "mAP75": float(m.box.map75)}
    warned = dropped_images_warning(split, **seen) if seen else None
    out.update({"warnings": [warned]} if warned else {})
    return {**out, "per_class": class_rows(m)} if per_class else out


def check_class_count(checkpoint, model_nc: int, data: str, data_nc: int | None) -> None:
    """Refuse (one line) a model whose class count is not its data's: its mAP would look ordinary and mean nothing."""
    if data_nc is not None and model_nc != int(data_nc):
        raise ConfigError(f"{checkpoint} detects {model_nc} classes but {data} has {data_nc}: validate it with a "
                          f"data yaml of its own {model_nc} classes")


def images_read(dataset) -> dict[str, int]:
    """How many images the split lists and how many Ultralytics' dataset kept (it drops a corrupt image or label)."""
    return {"listed": len(dataset.get_img_files(dataset.img_path)), "kept": len(dataset.im_files)}


def dropped_images_warning(split: str, listed: int, kept: int) -> str | None:
    """The warning a result carries when the validator dropped images of the split; None when it kept them all."""
    if kept >= listed:
        return None
    return (f"warning: {listed - kept} of {listed} {split} images were dropped (corrupt image or label, see "
            f"Ultralytics' warnings): this mAP is over the other {kept} only")


@contextlib.contextmanager
def captured_output(logfile: str | Path | None):
    """Ultralytics' and NNCF's loggers at WARNING, and whatever reaches file descriptors 1 and 2 (progress bars,
    native libraries) appended to `logfile` through the atomic writer; None: nothing is captured."""
    if logfile is None:
        yield
        return
    from ultralytics.utils import LOGGER

    loggers = [(g, g.level) for g in (LOGGER, logging.getLogger("nncf"))]
    sys.stdout.flush()
    sys.stderr.flush()
    saved, logfile = (os.dup(1), os.dup(2)), Path(logfile)
    with tempfile.TemporaryFile() as buf, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        try:
            for g, _ in loggers:
                g.setLevel(logging.WARNING)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for g, level in loggers:
                g.setLevel(level)
            buf.seek(0)
            atomic_write_bytes(logfile, (logfile.read_bytes() if logfile.is_file() else b"") + buf.read())


def check_onnx_input(path: str | Path, imgsz: int) -> bool:
    """Refuse (one line) an ONNX file that is missing, unreadable, or whose static input is not imgsz; True when its
    input shape is static."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise CheckpointError(f"cannot read {p} as ONNX: {type(e).__name__}") from e
    dims = [d.dim_value if d.HasField("dim_value") else None for d in
            model.graph.input[0].type.tensor_type.shape.dim] if model.graph.input else []
    if len(dims) == 4 and dims[2] and dims[2] != imgsz:
        raise CheckpointError(f"{p} was exported for imgsz {dims[2]}; validate it with --imgsz {dims[2]} or export "
                              f"it again at {imgsz}")
    return len(dims) == 4 and all(dims)


def class_rows(metrics) -> list[dict]:
    """Per-class rows of Ultralytics' DetMetrics: class index, name, labelled instances, mAP50 (box.ap50) and
    mAP50-95 (box.maps), for each class of box.ap_class_index (the classes with labels in the split)."""
    box = metrics.box
    return [{"class": int(c), "name": metrics.names.get(int(c), str(c)), "instances": int(metrics.nt_per_class[c]),
             "mAP50": float(box.ap50[i]), "mAP50-95": float(box.maps[c])} for i, c in enumerate(box.ap_class_index)]


PAIR_METRICS = ("mAP50", "mAP75", "mAP50-95", "precision", "recall")


def validate_pair(baseline: str | Path, checkpoint: str | Path, data: str, imgsz: int = 640, batch: int = 16,
                  device: str | None = None, split: str = "val", per_class: bool = False) -> dict:
    """The original validate.py's --fp32 mode: the baseline and the checkpoint validated with the same settings;
    {"baseline": …, "checkpoint": …, "difference": checkpoint − baseline per metric}, with "per_class" rows of
    both side by side under `per_class`. Both files are read before the first validation."""
    for path in (baseline, checkpoint):
        load_model(path)
    base, ckpt = (validate(path, data, imgsz, batch, device, split, per_class=per_class)
                  for path in (baseline, checkpoint))
    out = {"baseline": base, "checkpoint": ckpt, "difference": {k: ckpt[k] - base[k] for k in PAIR_METRICS}}
    if per_class:
        out["per_class"] = pair_class_rows(base["per_class"], ckpt["per_class"])
    return out


def pair_class_rows(base_rows: list[dict], ckpt_rows: list[dict]) -> list[dict]:
    """class_rows of two validations on the same split side by side (the same classes: those with labels)."""
    theirs = {row["class"]: row for row in ckpt_rows}
    rows = []
    for b in base_rows:
        c = theirs[b["class"]]
        rows.append({"class": b["class"], "name": b["name"], "instances": b["instances"],
                     "baseline mAP50": b["mAP50"], "checkpoint mAP50": c["mAP50"],
                     "difference mAP50": c["mAP50"] - b["mAP50"], "baseline mAP50-95": b["mAP50-95"],
                     "checkpoint mAP50-95": c["mAP50-95"], "difference mAP50-95": c["mAP50-95"] - b["mAP50-95"]})
    return rows
