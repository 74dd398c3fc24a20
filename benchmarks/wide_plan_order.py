#!/usr/bin/env python
"""Order of the wide plan's stages: post-training ternarisation of each candidate group alone (no training), on the
retention budget's val half; the group that loses least goes first. Prints a table and writes JSON.

  python benchmarks/wide_plan_order.py --out benchmarks/results/wide_plan_order.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common import REPO, parser, print_table, provenance, require

from yolo_tq.config import StageConfig, load_config
from yolo_tq.eval.validate import validate
from yolo_tq.io import save_stock_checkpoint, write_json
from yolo_tq.quant.apply import export_ternary, quantized_modules
from yolo_tq.train.stages import post_training_model

GROUPS = {  # name: (layers, include_1x1, detect_head)
    "neck P4/P5 (17,19,20,22)": ([17, 19, 20, 22], True, False),
    "backbone deep + neck P3 (7,8,9,13,16)": ([7, 8, 9, 13, 16], True, False),
    "backbone early (1-6)": ([1, 2, 3, 4, 5, 6], True, False),
    "Detect head inner convs": ([23], True, True),
}


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "imgsz", "config")
    p.add_argument("--threshold", type=float, default=0.7, help="threshold of every group (the config gives the rest "
                   "of the quantization settings)")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "wide_order"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "wide_plan_order.json"))
    return p.parse_args()


def main() -> None:
    a = parse_args()
    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    cfg = load_config(a.config)
    fp = validate(str(weights), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
    rows = [{"group": "FP baseline", "mAP50-95": fp, "loss": 0.0}]
    for name, (layers, one, head) in GROUPS.items():
        stage = StageConfig(name=name, layers=layers, include_1x1=one, threshold=a.threshold, detect_head=head)
        model = post_training_model(dataclasses.replace(cfg, stages=[stage]), [0], str(weights))
        quantized = quantized_modules(model)
        params = sum(m.latent_weight.numel() for m in quantized.values())
        out = save_stock_checkpoint(export_ternary(model), Path(a.workdir) / f"{len(rows)}.pt")
        m = validate(str(out), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
        rows.append({"group": name, "layers": layers, "include_1x1": one, "detect_head": head, "convs": len(quantized),
                     "ternary_params": params, "mAP50-95": m, "loss": fp - m})
        print(f"[order] {name}: {m:.4f}", flush=True)
    write_json({"benchmark": "wide_plan_order", "provenance": provenance(), "threshold": a.threshold,
                "imgsz": a.imgsz, "rows": rows}, a.out)
    print_table(rows, [("group", "group", "s"), ("convs", "convs", "d"), ("ternary_params", "ternary params", ",d"),
                       ("mAP50-95", "mAP50-95", ".4f"), ("loss", "loss", ".4f")])


if __name__ == "__main__":
    main()
