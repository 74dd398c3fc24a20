"""Validate any checkpoint (FP baseline, stage training checkpoint, ternary export) with Ultralytics' validator:
mAP50, mAP75, mAP50-95, precision, recall; --per-class adds each class's mAP50 and mAP50-95.

--fp32 BASELINE is the original validate.py's comparison mode: the baseline and CKPT are validated with the same
settings and shown side by side with the difference (CKPT − baseline) and the relative change.

  python validate.py checkpoints/yolo11n/stage1/ternary.pt --data coco.yaml --imgsz 640
  python validate.py checkpoints/yolo11n/stage3/ternary.pt --fp32 yolo11n.pt --data coco.yaml --per-class
  yolo-tq val CKPT --data coco128.yaml --imgsz 320 --json metrics.json
"""

from __future__ import annotations

import argparse

from ..io import check_writable, printable
from .args import data_path, imgsz_arg, input_file, output_path, positive_int

METRICS = ("mAP50", "mAP75", "mAP50-95", "precision", "recall")
CLASS_COLUMNS = [("class", "class", "d"), ("name", "name", "s"), ("instances", "instances", "d"),
                 ("mAP50", "mAP50", ".4f"), ("mAP50-95", "mAP50-95", ".4f")]
PAIR_COLUMNS = [("metric", "metric", "s"), ("baseline", "baseline", ".4f"), ("checkpoint", "checkpoint", ".4f"),
                ("difference", "difference", "+.4f"), ("change", "change", "+.1%")]
_SIDES = (("baseline", "base", ".4f"), ("checkpoint", "ckpt", ".4f"), ("difference", "diff", "+.4f"))
PAIR_CLASS_COLUMNS = CLASS_COLUMNS[:3] + [(f"{who} {k}", f"{short} {k}", f) for k in ("mAP50", "mAP50-95")
                                          for who, short, f in _SIDES]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=input_file, help="a .pt checkpoint (the quantized model under --fp32)")
    p.add_argument("--data", required=True, type=data_path, help="Ultralytics data yaml (name or path)")
    p.add_argument("--fp32", type=input_file, metavar="BASELINE",
                   help="also validate this baseline checkpoint with the same settings and show both side by side")
    p.add_argument("--per-class", action="store_true", help="also each class's mAP50 and mAP50-95")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="a multiple of 32 (default: 640)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, ...")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--json", type=output_path, help="also write the metrics to this JSON file")


def pair_table(r: dict) -> str:
    """The --fp32 table: one row per metric, baseline and checkpoint side by side."""
    from ..eval.compare import format_table

    base, ckpt = r["baseline"], r["checkpoint"]
    rows = [{"metric": k, "baseline": base[k], "checkpoint": ckpt[k], "difference": r["difference"][k],
             "change": r["difference"][k] / base[k] if base[k] > 0 else None} for k in METRICS]
    return format_table(rows, PAIR_COLUMNS)


def class_table(rows: list[dict], columns, split: str) -> str:
    """The per-class table; class names (from a file) with control characters escaped (io.printable)."""
    from ..eval.compare import format_table

    rows = [{**r, "name": printable(r["name"])} for r in rows]
    return f"\nper class ({split} split, classes with labels):\n{format_table(rows, columns)}"


def run(a: argparse.Namespace) -> int:
    from ..eval.validate import validate, validate_pair
    from ..io import write_json

    if a.json:
        check_writable(a.json, "the metrics JSON", inputs=[a.checkpoint, a.fp32, a.data])
    if a.fp32:
        r = validate_pair(a.fp32, a.checkpoint, a.data, a.imgsz, a.batch, a.device, a.split, a.per_class)
        print(f"{'baseline':<12} {a.fp32}\n{'checkpoint':<12} {a.checkpoint}\n\n{pair_table(r)}")
        if a.per_class:
            print(class_table(r["per_class"], PAIR_CLASS_COLUMNS, a.split))
    else:
        r = validate(a.checkpoint, a.data, a.imgsz, a.batch, a.device, a.split, per_class=a.per_class)
        print(f"{'checkpoint':<12} {r['checkpoint']}")
        for k in METRICS:
            print(f"{k:<12} {r[k]:.4f}")
        if a.per_class:
            print(class_table(r["per_class"], CLASS_COLUMNS, a.split))
    if a.json:
        write_json(r, a.json)
    results = [r["baseline"], r["checkpoint"]] if a.fp32 else [r]
    for warning in (w for one in results for w in one.get("warnings", [])):
        print(warning)  # last, so that a dropped image is never read past as a plain mAP
    return 0
