#!/usr/bin/env python
"""Sensitivity of each layer group to each weight kind, for choosing a mixed plan and the wide plan's stage order
(the group that loses least goes first): every group of the wide plan (GROUPS) quantized alone, post-training (no
training: TTQ's Wp/Wn and LSQ's steps initialised from the weights as training starts), at 4 and 2 bits (LSQ) and
ternary (TTQ), then validated; with each group's parameter count, so the mAP lost can be set against the bytes
saved. A cheap proxy for trained sensitivity.

  python benchmarks/group_sensitivity.py --out benchmarks/results/group_sensitivity.json
  python benchmarks/group_sensitivity.py --kinds ttq --out ...  (the wide plan's order; wide_plan_order.json came
                                                                 from its predecessor wide_plan_order.py, 40fc91f)
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
KINDS = {"int4": {"kind": "int", "bits": 4}, "int2": {"kind": "int", "bits": 2}, "ttq": {"kind": "ttq"}}


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "imgsz", "config")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--threshold", type=float, default=0.7, help="TTQ threshold of every group")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "group_sensitivity"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "group_sensitivity.json"))
    return p.parse_args()


def main() -> None:
    a = parse_args()
    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    cfg = load_config(a.config)
    fp = validate(str(weights), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
    rows = [{"group": "FP baseline", "kind": "fp", "mAP50-95": fp, "loss": 0.0}]
    for kind in a.kinds:
        for name, (layers, one, head) in GROUPS.items():
            stage = StageConfig(name=name, layers=layers, include_1x1=one, threshold=a.threshold, detect_head=head,
                                weights=KINDS[kind])
            model = post_training_model(dataclasses.replace(cfg, stages=[stage]), [0], str(weights))
            quantized = quantized_modules(model)
            params = sum(m.latent_weight.numel() for m in quantized.values())
            out = save_stock_checkpoint(export_ternary(model), Path(a.workdir) / f"{kind}_{len(rows)}.pt")
            m = validate(str(out), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
            rows.append({"group": name, "kind": kind, "layers": layers, "include_1x1": one, "detect_head": head,
                         "convs": len(quantized), "params": params, "mAP50-95": m, "loss": fp - m})
            print(f"[sensitivity] {kind} {name}: {m:.4f}", flush=True)
    write_json({"benchmark": "group_sensitivity", "provenance": provenance(), "threshold": a.threshold,
                "imgsz": a.imgsz, "rows": rows}, a.out)
    print_table(rows, [("kind", "kind", "s"), ("group", "group", "s"), ("convs", "convs", "d"),
                       ("params", "params", ",d"), ("mAP50-95", "mAP50-95", ".4f"), ("loss", "loss", ".4f")])


if __name__ == "__main__":
    main()
