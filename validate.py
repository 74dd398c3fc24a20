#!/usr/bin/env python
"""Validate any checkpoint (FP baseline, stage training checkpoint, ternary export) with Ultralytics' validator.

  python validate.py checkpoints/yolo11n/stage1/ternary.pt --data coco.yaml --imgsz 640
"""

import argparse
import json

from src.cli import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt checkpoint")
    p.add_argument("--data", required=True, help="Ultralytics data yaml (name or path)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, ...")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--json", help="also write the metrics to this JSON file")
    a = p.parse_args()

    from src.evaluation import validate

    r = validate(a.checkpoint, a.data, a.imgsz, a.batch, a.device, a.split)
    print(f"{'checkpoint':<12} {r['checkpoint']}")
    for k in ("mAP50", "mAP50-95", "precision", "recall"):
        print(f"{k:<12} {r[k]:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
