#!/usr/bin/env python
"""Retention benchmark: how much accuracy progressive TTQ keeps on a fixed small budget.

Budget (fixed): ../shared yolo11n, 128 coco128 train images, 128 val images, imgsz 320, batch 16, CPU,
--epochs per stage (10), stages 1 -> 2 -> 3 cumulatively. Prints a table and writes JSON with:
FP baseline; post-training ternarisation (no training) of each cumulative stage and of stages 2 and 3 alone;
mAP after training each stage; seconds per training epoch.

  python benchmarks/ttq_retention.py --out benchmarks/results/ttq_retention.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from functools import partial
from pathlib import Path

from common import BENCH_SETTINGS, REPO, epoch_timer, mean_time, parser, print_table, provenance, require, validate_sizes

from yolo_tq.config import load_config, stage_outputs
from yolo_tq.io import write_json
from yolo_tq.train.stages import post_training_ternary, train_stages

# Post-training rows: name, 0-based stage indices ternarised together.
PTQ_PLANS = [("PTQ stage 1", [0]), ("PTQ stages 1-2", [0, 1]), ("PTQ stages 1-3", [0, 1, 2]),
             ("PTQ stage 2 alone", [1]), ("PTQ stage 3 alone", [2])]


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "config", "epochs", "imgsz", "batch", "device")
    p.add_argument("--stages", type=int, default=3, help="train stages 1..N")
    p.add_argument("--set", dest="dotlist", action="append", default=[],
                   help="config override KEY=VALUE (added after the benchmark's own: " + ", ".join(BENCH_SETTINGS) + ")")
    p.add_argument("--also-imgsz", type=int, nargs="*", default=[640],
                   help="also validate every row at these image sizes (default: 640, the deployment default)")
    p.add_argument("--skip-ptq", action="store_true", help="skip the post-training ternarisation rows")
    p.add_argument("--ptq-bn-images", type=int, default=128,
                   help="also report each PTQ row with BatchNorm re-estimated on this many train images (0: no)")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "retention"))
    p.add_argument("--tag", default="", help="label stored in the JSON")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep --out's rows and the finished stages' checkpoints")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ttq_retention.json"))
    return p.parse_args()


def stage_row_name(n: int) -> str:
    return f"TTQ stages 1-{n}" if n > 1 else "TTQ stage 1"


def new_result(a: argparse.Namespace, weights: Path, data: Path) -> dict:
    """The JSON document; with --resume it holds --out's earlier rows."""
    result = {"benchmark": "ttq_retention", "tag": a.tag, "provenance": provenance(),
              "budget": {"weights": str(weights), "data": str(data), "epochs_per_stage": a.epochs,
                         "imgsz": a.imgsz, "batch": a.batch, "device": a.device},
              "config_overrides": BENCH_SETTINGS + a.dotlist, "rows": []}
    if a.resume and Path(a.out).is_file():
        previous = json.loads(Path(a.out).read_text())
        result["rows"].extend(previous["rows"])
        result["resumed"] = {"earlier_provenance": previous.get("provenance"), "earlier": previous.get("resumed"),
                             "rows_before": [r["name"] for r in previous["rows"]]}
    return result


def add(result: dict, row: dict, out: str) -> None:
    """Append a row and rewrite the JSON (an interrupted run keeps every finished row)."""
    result["rows"].append(row)
    write_json(result, out)
    print(f"[retention] {row['name']}: mAP50 {row['mAP50']:.4f}  mAP50-95 {row['mAP50-95']:.4f}", flush=True)


def ptq_rows(a, cfg, weights: Path, work: Path, val, result: dict, have: set) -> None:
    """Post-training ternarisation of each plan, as configured and (--ptq-bn-images) with BatchNorm re-estimated."""
    bn_cfg = copy.deepcopy(cfg)
    bn_cfg.quantization.bn_reestimate_images = a.ptq_bn_images
    variants = [("", cfg, "")] + ([(f" + BN re-est. ({a.ptq_bn_images} img)", bn_cfg, "_bn")] if a.ptq_bn_images else [])
    for suffix, c, tag in variants:
        for name, idx in PTQ_PLANS:
            if max(idx) >= len(cfg.stages) or name + suffix in have:
                continue
            out = post_training_ternary(c, idx, str(weights), work / "ptq" / f"ptq_{'_'.join(map(str, idx))}{tag}.pt")
            add(result, {"name": name + suffix, "kind": "ptq", "stages": [i + 1 for i in idx], **val(str(out)),
                         "bn_reestimate_images": c.quantization.bn_reestimate_images}, a.out)


def trained_rows(a, cfg, val, result: dict, have: set) -> None:
    """Train stages 1..--stages cumulatively; one row per stage (its ternary export) with seconds per epoch."""
    for n in range(1, min(a.stages, len(cfg.stages)) + 1):
        if stage_row_name(n) in have:
            continue
        callbacks, times = epoch_timer()
        start = time.perf_counter()
        train_stages(cfg, [n], start=None, callbacks=callbacks)
        wall = time.perf_counter() - start
        out = stage_outputs(cfg, cfg.stages[n - 1])
        add(result, {"name": stage_row_name(n), "kind": "trained", "stage": n, **val(str(out.ternary)),
                     "epochs": a.epochs, "sec_per_epoch": mean_time(times),
                     "stage_wall_s": wall, "ternary_export": str(out.ternary)}, a.out)


def finish(result: dict, out: str, sizes: list[int]) -> None:
    """Retention of every row against the FP baseline; final JSON and table."""
    rows = result["rows"]
    fp = next(r["mAP50-95"] for r in rows if r["name"] == "FP baseline")
    for r in rows:
        r["retention"] = r["mAP50-95"] / fp if fp else None
    write_json(result, out)
    print()
    print_table(rows, [("name", "model", "s"), ("mAP50", "mAP50", ".4f"), ("mAP50-95", "mAP50-95", ".4f"),
                       ("retention", "kept", ".1%"), *[(f"mAP50-95@{s}", f"@{s}", ".4f") for s in sizes[1:]],
                       ("sec_per_epoch", "s/epoch", ".1f")])
    print(f"\nJSON: {out}")


def main() -> None:
    a = parse_args()
    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    work = Path(a.workdir)
    if not a.resume:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # never continue from an earlier run's stages
    cfg = load_config(a.config, {"weights": str(weights), "data": str(data), "epochs": a.epochs, "imgsz": a.imgsz,
                                 "batch": a.batch, "device": a.device, "checkpoint_dir": str(work / "checkpoints")},
                      BENCH_SETTINGS + a.dotlist)
    sizes = [a.imgsz] + [s for s in a.also_imgsz if s != a.imgsz]
    val = partial(validate_sizes, data=str(data), sizes=sizes, device=a.device, project=str(work / "val"))
    result = new_result(a, weights, data)
    have = {r["name"] for r in result["rows"]}
    if "FP baseline" not in have:
        add(result, {"name": "FP baseline", "kind": "fp", **val(str(weights))}, a.out)
    if not a.skip_ptq:
        ptq_rows(a, cfg, weights, work, val, result, have)
    trained_rows(a, cfg, val, result, have)
    finish(result, a.out, sizes)


if __name__ == "__main__":
    main()
