#!/usr/bin/env python
"""Order of the wide plan's stages: post-training ternarisation of each candidate group alone (no training), on the
retention budget's val half; the group that loses least goes first. Prints a table and writes JSON.

  python benchmarks/wide_plan_order.py --out benchmarks/results/wide_plan_order.json
"""

from __future__ import annotations

import argparse

from common import REPO, SHARED_DATA, SHARED_WEIGHTS, print_table, provenance, require, write_json

GROUPS = {  # name: (layers, include_1x1, detect_head)
    "neck P4/P5 (17,19,20,22)": ([17, 19, 20, 22], True, False),
    "backbone deep + neck P3 (7,8,9,13,16)": ([7, 8, 9, 13, 16], True, False),
    "backbone early (1-6)": ([1, 2, 3, 4, 5, 6], True, False),
    "Detect head inner convs": ([23], True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(SHARED_WEIGHTS))
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "wide_order"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "wide_plan_order.json"))
    a = p.parse_args()

    from src.checkpoints import load_model, save_stock_checkpoint
    from src.evaluation import validate
    from src.quantization.shadow_weight_manager import LayerPlan, ShadowWeightManager

    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    fp = validate(str(weights), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
    rows = [{"group": "FP baseline", "mAP50-95": fp, "loss": 0.0}]
    for name, (layers, one, head) in GROUPS.items():
        model, _ = load_model(weights)
        mgr = ShadowWeightManager(model)
        added = mgr.install(LayerPlan(tuple(layers), one, a.threshold, detect_head=head))
        params = sum(m.latent_weight.numel() for m in mgr.quantized.values())
        out = save_stock_checkpoint(mgr.export_ternary(), f"{a.workdir}/{len(rows)}.pt")
        m = validate(str(out), str(data), a.imgsz, 16, "cpu")["mAP50-95"]
        rows.append({"group": name, "layers": layers, "include_1x1": one, "detect_head": head, "convs": len(added),
                     "ternary_params": params, "mAP50-95": m, "loss": fp - m})
        print(f"[order] {name}: {m:.4f}", flush=True)
    write_json({"benchmark": "wide_plan_order", "provenance": provenance(), "threshold": a.threshold,
                "imgsz": a.imgsz, "rows": rows}, a.out)
    print_table(rows, [("group", "group", "s"), ("convs", "convs", "d"), ("ternary_params", "ternary params", ",d"),
                       ("mAP50-95", "mAP50-95", ".4f"), ("loss", "loss", ".4f")])


if __name__ == "__main__":
    main()
