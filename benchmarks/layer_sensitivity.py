#!/usr/bin/env python
"""Which of a stage's layers costs the most when ternarised? For each yaml layer of stage N, ternarise that layer
alone (post-training, the same rule and threshold as the stage; Wp/Wn initialised as training starts) on top of a
start checkpoint, and validate the ternary export. A cheap proxy for trained sensitivity: no training.

  python benchmarks/layer_sensitivity.py --stage 3 --start benchmarks/work/stage3_start/stage2_best.pt \
      --out benchmarks/results/stage3_layer_sensitivity.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import REPO, parser, print_table, provenance, require, validate_sizes

from yolo_tq.config import load_config
from yolo_tq.io import write_json
from yolo_tq.train.stages import post_training_ternary


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "config", "imgsz", "device")
    p.add_argument("--stage", type=int, required=True, help="stage whose layers are tried one at a time (1-based)")
    p.add_argument("--start", required=True, help="checkpoint to ternarise on top of (stages 1..N-1 ternary)")
    p.add_argument("--also-imgsz", type=int, nargs="*", default=[640], help="also validate at these image sizes")
    p.add_argument("--bn-images", type=int, default=0, help="re-estimate BatchNorm on N train images after each")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "layer_sensitivity"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layer_sensitivity.json"))
    return p.parse_args()


def main() -> None:
    a = parse_args()
    weights, data, start = require(a.weights, "weights"), require(a.data, "data yaml"), require(a.start, "start")
    base = {"weights": str(weights), "data": str(data), "imgsz": a.imgsz, "device": a.device}
    index = a.stage - 1
    layers = list(load_config(a.config, base).stages[index].layers)
    sizes = [a.imgsz] + [s for s in a.also_imgsz if s != a.imgsz]
    rows = [{"layers": "none (start)", **validate_sizes(str(start), str(data), sizes, a.device)}]
    for layer in layers + ["all"]:
        chosen = layers if layer == "all" else [layer]
        cfg = load_config(a.config, base, [f"stages[{index}].layers={chosen}",
                                           f"quantization.bn_reestimate_images={a.bn_images}"])
        out = post_training_ternary(cfg, [index], str(start), Path(a.workdir) / f"layer_{layer}.pt")
        rows.append({"layers": str(layer), **validate_sizes(str(out), str(data), sizes, a.device)})
        print(f"[sensitivity] layer {layer}: mAP50-95 {rows[-1]['mAP50-95']:.4f}", flush=True)
    for r in rows:
        r["change_vs_start"] = r["mAP50-95"] - rows[0]["mAP50-95"]
    write_json({"benchmark": "layer_sensitivity", "stage": a.stage, "start": str(start), "bn_images": a.bn_images,
                "imgsz": sizes, "provenance": provenance(), "rows": rows}, a.out)
    print_table(rows, [("layers", "ternarised", "s"), ("mAP50-95", "mAP50-95", ".4f"),
                       ("mAP50-95@640", "@640", ".4f"), ("change_vs_start", "vs start", "+.4f")])
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
