"""Validate any checkpoint (FP baseline, stage training checkpoint, ternary export) with Ultralytics' validator.

  python validate.py checkpoints/yolo11n/stage1/ternary.pt --data coco.yaml --imgsz 640
  yolo-tq val CKPT --data coco128.yaml --imgsz 320 --json metrics.json
"""

from __future__ import annotations

import argparse

from ..cli import check_writable, imgsz_arg, input_file, positive_int

METRICS = ("mAP50", "mAP50-95", "precision", "recall")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=input_file, help="a .pt checkpoint")
    p.add_argument("--data", required=True, help="Ultralytics data yaml (name or path)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="a multiple of 32 (default: 640)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, ...")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--json", help="also write the metrics to this JSON file")


def run(a: argparse.Namespace) -> int:
    from ..eval.validate import validate
    from ..io import write_json

    if a.json:
        check_writable(a.json, "the metrics JSON")
    r = validate(a.checkpoint, a.data, a.imgsz, a.batch, a.device, a.split)
    print(f"{'checkpoint':<12} {r['checkpoint']}")
    for k in METRICS:
        print(f"{k:<12} {r[k]:.4f}")
    if a.json:
        write_json(r, a.json)
    return 0
