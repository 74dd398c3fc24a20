#!/usr/bin/env python
"""Does BatchNorm re-estimation help a TTQ-*trained* model? (For post-training ternarisation see ttq_retention.py's
"+ BN re-est." rows.) For each training checkpoint given, validates its ternary export as trained, then again after
re-estimating every BN layer's statistics on N train images (val-style letterbox, no labels).

  python benchmarks/bn_reestimation.py benchmarks/work/retention/checkpoints/yolo11n/stage{1,2,3}/weights/best.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import REPO, parser, print_table, provenance, require

from yolo_tq.eval.validate import validate
from yolo_tq.io import load_model, save_stock_checkpoint, write_json
from yolo_tq.quant.apply import export_ternary
from yolo_tq.train.batchnorm import reestimate_on_split


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "data", "imgsz")
    p.add_argument("checkpoints", nargs="+", help="training checkpoints (best.pt of TTQ stages)")
    p.add_argument("--images", type=int, default=128, help="train images for the re-estimation")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "bn_reestimation"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bn_reestimation_trained.json"))
    return p.parse_args()


def main() -> None:
    a = parse_args()
    data = str(require(a.data, "data yaml"))
    rows = []
    for i, ckpt in enumerate(a.checkpoints):
        require(ckpt, "checkpoint")
        row = {"checkpoint": ckpt}
        for n in (0, a.images):
            model, saved = load_model(ckpt)
            model.float()
            if n:
                reestimate_on_split(model, data, n, a.imgsz)
            out = Path(a.workdir) / f"c{i}_bn{n}.pt"
            save_stock_checkpoint(export_ternary(model), out, train_args=saved.get("train_args"))
            row["as trained" if n == 0 else "BN re-estimated"] = validate(str(out), data, a.imgsz, 16)["mAP50-95"]
        row["change"] = row["BN re-estimated"] - row["as trained"]
        rows.append(row)
        print(f"[bn] {ckpt}: {row['as trained']:.4f} -> {row['BN re-estimated']:.4f}", flush=True)
    write_json({"benchmark": "bn_reestimation_trained", "images": a.images, "imgsz": a.imgsz, "data": data,
                "provenance": provenance(), "rows": rows}, a.out)
    print_table(rows, [("checkpoint", "checkpoint", "s"), ("as trained", "as trained", ".4f"),
                       ("BN re-estimated", "BN re-est.", ".4f"), ("change", "change", "+.4f")])
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
