#!/usr/bin/env python
"""With / without each training switch for one stage, on the retention benchmark's budget.

Every variant trains the same stage N of configs/stage1_progressive.yaml from the same starting checkpoint (for
N > 1 the stage N-1 output of `ttq_retention.py`, i.e. the model with stages 1..N-1 ternary; for N = 1 the FP
weights), 10 epochs, imgsz 320,
batch 16, then validates the stage's ternary export on the val half. The config's defaults are one variant; each
other variant changes one thing. Rows are written to the JSON as they finish; --resume skips rows already there.

  python benchmarks/stage_ablation.py --stage 3 \
      --start benchmarks/work/retention/checkpoints/yolo11n/stage2/weights/best.pt \
      --out benchmarks/results/stage3_ablation.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import REPO, parser, print_table, provenance, require, validate_sizes
from common import BENCH_SETTINGS

from yolo_tq.config import load_config, stage_outputs
from yolo_tq.eval.validate import validate
from yolo_tq.io import write_json
from yolo_tq.train.stages import train_stages


def variants(stage: int) -> dict[str, list[str]]:
    """Name -> config overrides (dotlist) on top of the config's defaults; `stage` is 1-based."""
    s = f"stages[{stage - 1}]"
    return {
        "config defaults": [],
        "without distillation": ["distill.enabled=false"],
        "without latent lr (latent weights at lr0)": ["train.latent_lr=null"],
        "latent lr 3e-3": ["train.latent_lr=0.003"],
        "latent weight decay 0": ["train.latent_weight_decay=0"],
        "latent weight decay 5e-3 (10x)": ["train.latent_weight_decay=0.005"],
        "teacher = stage start (not FP)": ["distill.teacher=start"],
        "threshold 0.9 for this stage": [f"{s}.threshold=0.9"],
        "feature weight 4": ["distill.feature_weight=4"],
        "all distillation weights x4": ["distill.cls_weight=4", "distill.box_weight=4", "distill.feature_weight=4"],
        "lr0 3e-4": ["train.lr0=0.0003"],
        "per-channel scales (this stage's layers)": ["quantization.per_channel=true"],
        "distillation without feature term": ["distill.feature_weight=0"],
        "batch 8 (twice the steps)": ["train.batch=8", "train.ultralytics.nbs=8"],
        "seed 1 (run-to-run spread)": ["train.seed=1"],
        # candidates for the early backbone (stage 3): gradual ternarisation and multi-scale training
        "incremental ternarisation (magnitude ramp 0.5 -> 1 over 6 epochs)":
            ["train.ternary_ramp=magnitude", "train.ternary_ramp_epochs=6", "train.ternary_ramp_start=0.5"],
        "layer by layer, deep first (over 6 epochs)": ["train.ternary_ramp=layer_deep_first", "train.ternary_ramp_epochs=6"],
        "layer by layer, early first (over 6 epochs)": ["train.ternary_ramp=layer_early_first",
                                                        "train.ternary_ramp_epochs=6"],
        "multi-scale training (imgsz x0.5..x1.5)": ["train.ultralytics.multi_scale=0.5"],
        "freeze the ternary pattern in the last 3 epochs": ["train.ternary_freeze_epochs=3"],
        "threshold 0.5 for this stage (fewer zeros)": [f"{s}.threshold=0.5"],
        "frozen BatchNorm statistics (the FP model's)": ["train.bn_frozen_stats=true"],
        "only this stage's layers train (the rest frozen)": ["train.trainable=stage"],
        "learned thresholds (t per layer, threshold lr 1e-3)": ["quantization.learn_threshold=true"],
        "learned thresholds (t per layer, threshold lr 1e-2)": ["quantization.learn_threshold=true",
                                                                "train.threshold_lr=0.01"],
        # augmented views: with 10 epochs, Ultralytics' close_mosaic 10 turns mosaic off for the whole run
        "mosaic throughout (close_mosaic 0)": ["train.ultralytics.close_mosaic=0"],
        "mosaic for all but the last 2 epochs (close_mosaic 2)": ["train.ultralytics.close_mosaic=2"],
        "per-channel thresholds (this stage's layers)": ["quantization.threshold_per_channel=true"],
        "per-channel thresholds and scales (this stage's layers)": ["quantization.threshold_per_channel=true",
                                                                    "quantization.per_channel=true"],
        "feature reconstruction of the new layers first (100 steps)": ["distill.reconstruct_steps=100"],
        "feature reconstruction of the new layers first (300 steps)": ["distill.reconstruct_steps=300"],
        # training that holds across resolutions: the stage's last epochs at the deployment size
        "final 2 epochs at imgsz 640 (deployment size)": ["train.final_imgsz=640", "train.final_epochs=2"],
        "final 2 epochs at imgsz 640, 300 reconstruction steps": ["train.final_imgsz=640", "train.final_epochs=2",
                                                                  "distill.reconstruct_steps=300"],
        "final 4 epochs at imgsz 640 (deployment size)": ["train.final_imgsz=640", "train.final_epochs=4"],
        "reconstruction at imgsz 640 (100 steps)": ["distill.reconstruct_imgsz=640"],
        "reconstruction lr 3e-3 (100 steps)": ["distill.reconstruct_lr=0.003"],
        "reconstruction at imgsz 640, final 2 epochs at 640": ["distill.reconstruct_imgsz=640", "train.final_imgsz=640",
                                                               "train.final_epochs=2"],
        "latent lr 3e-4 (after reconstruction)": ["train.latent_lr=0.0003"],
        "latent lr 1e-4 (after reconstruction)": ["train.latent_lr=0.0001"],
        "latent lr 3e-4, final 2 epochs at imgsz 640": ["train.latent_lr=0.0003", "train.final_imgsz=640",
                                                        "train.final_epochs=2"],
        "latent lr 3e-4, ternary pattern frozen in the last 3 epochs": ["train.latent_lr=0.0003",
                                                                        "train.ternary_freeze_epochs=3"],
        # control (with --stage 1 from the FP weights): the same fine-tuning with no layer ternarised
        "FP control: nothing ternarised": [f"{s}.layers=[]", "distill.reconstruct_steps=0"],
    }


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "config", "epochs", "imgsz", "batch", "device",
               weights="FP model (distillation teacher)")
    p.add_argument("--stage", type=int, required=True, help="stage to train (1, 2 or 3)")
    p.add_argument("--start", required=True, help="checkpoint holding stages 1..N-1 (training best.pt)")
    p.add_argument("--only", nargs="*", help="run only these variant names (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train each variant with each of these seeds")
    p.add_argument("--also-imgsz", type=int, nargs="*", default=[640], help="also validate at these image sizes")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "ablation"))
    p.add_argument("--resume", action="store_true", help="keep --out's rows and skip those variants")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/stage<N>_ablation.json)")
    return p.parse_args()


def run_variant(a, name: str, seed: int, table: dict, weights: Path, data: Path, start: Path, start_map: float) -> dict:
    """Train stage --stage with one variant's overrides (and `seed`) from `start`; its row (mAP of the stage's
    ternary export at --imgsz and at --also-imgsz)."""
    work = Path(a.workdir) / f"stage{a.stage}" / f"v{list(table).index(name):02d}_s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    settings = table[name] + ([f"train.seed={seed}"] if seed else [])
    cfg = load_config(a.config, {"weights": str(weights), "data": str(data), "epochs": a.epochs,
                                 "imgsz": a.imgsz, "device": a.device, "checkpoint_dir": str(work)},
                      [f"train.batch={a.batch}"] + BENCH_SETTINGS + settings)  # a variant may change batch
    t0 = time.perf_counter()
    train_stages(cfg, [a.stage], start=str(start))
    wall = time.perf_counter() - t0
    sizes = [a.imgsz] + [s for s in a.also_imgsz if s != a.imgsz]
    m = validate_sizes(str(stage_outputs(cfg, cfg.stages[a.stage - 1]).ternary), str(data), sizes, a.device)
    return {"variant": name, "seed": seed, "settings": settings, **m, "change_vs_start": m["mAP50-95"] - start_map,
            "wall_s": wall, "provenance": provenance()}


def main() -> None:
    a = parse_args()
    table = variants(a.stage)
    names = a.only or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from: {list(table)}")
    weights, data, start = require(a.weights, "weights"), require(a.data, "data yaml"), require(a.start, "start")
    out = Path(a.out or REPO / "benchmarks" / "results" / f"stage{a.stage}_ablation.json")
    result = {"benchmark": "stage_ablation", "stage": a.stage, "start": str(start),
              "budget": {"epochs": a.epochs, "imgsz": a.imgsz, "batch": a.batch, "device": a.device,
                         "weights": str(weights), "data": str(data)},
              "bench_settings": BENCH_SETTINGS, "rows": []}
    if a.resume and out.is_file():
        result["rows"] = json.loads(out.read_text())["rows"]
    have = {(r["variant"], r.get("seed", 0)) for r in result["rows"]}
    start_map = validate(str(start), str(data), a.imgsz, 16, a.device)["mAP50-95"]  # training checkpoint: fused
    result["start_mAP50-95"] = start_map
    print(f"[ablation] start {start}: mAP50-95 {start_map:.4f}", flush=True)
    for name in names:
        for seed in a.seeds:
            if (name, seed) in have:
                continue
            result["rows"].append(run_variant(a, name, seed, table, weights, data, start, start_map))
            write_json(result, out)
            row = result["rows"][-1]
            print(f"[ablation] {name} (seed {seed}): " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                  if k.startswith("mAP50-95")), flush=True)
    result["rows"].sort(key=lambda r: (list(table).index(r["variant"]) if r["variant"] in table else 99,
                                       r.get("seed", 0)))
    write_json(result, out)
    print_table(result["rows"], [("variant", "variant", "s"), ("seed", "seed", "d"), ("mAP50", "mAP50", ".4f"),
                                 ("mAP50-95", "mAP50-95", ".4f"), ("mAP50-95@640", "@640", ".4f"),
                                 ("change_vs_start", "vs start", "+.4f"),
                                 ("wall_s", "wall s", ".0f")])
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
