#!/usr/bin/env python
"""C2PSA retention benchmark: BitLinear_TTQ vs standard BitLinear on the TTQ retention budget.

Budget (fixed, as benchmarks/ttq_retention.py): ../shared yolo11n, 128 coco128 train / 128 val images, imgsz 320,
batch 16 (nbs 16: one optimizer step per batch), CPU, --epochs 10. Variants:
  fp_ttq, fp_standard   C2PSA alone, from the FP checkpoint (--weights)
  s3_ttq, s3_standard   from the stage-3 output of the TTQ retention run (--stage3): the full model
Rows: the start checkpoints themselves, the replacement without training (PTQ), and each trained variant, with
mAP50-95, the change against its start checkpoint and seconds per epoch. Rows are merged into --out by name, so the
variants can run in separate invocations (--variants).

  nice -n 10 python benchmarks/c2psa_retention.py --variants fp_ttq,fp_standard
  nice -n 10 python benchmarks/c2psa_retention.py --variants s3_ttq,s3_standard --stage3 PATH/stage3/weights/best.pt
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from functools import partial
from pathlib import Path

from common import REPO, epoch_timer, mean_time, parser, print_table, provenance, require

from yolo_tq.config import load_config, stage_outputs
from yolo_tq.eval.validate import validate
from yolo_tq.io import load_model, save_stock_checkpoint, write_json
from yolo_tq.train.stages import post_training_model, train_stages

DEFAULT_STAGE3 = REPO / "benchmarks" / "work" / "retention" / "checkpoints" / "yolo11n" / "stage3" / "weights" / "best.pt"
VARIANTS = {"fp_ttq": ("fp", "bitlinear_ttq"), "fp_standard": ("fp", "bitlinear_standard"),
            "s3_ttq": ("stage3", "bitlinear_ttq"), "s3_standard": ("stage3", "bitlinear_standard")}
CONFIGS = {"bitlinear_ttq": REPO / "configs" / "stage2_c2psa.yaml",
           "bitlinear_standard": REPO / "configs" / "stage2_c2psa_standard.yaml"}
LABELS = {"fp": "FP", "stage3": "stage 3", "bitlinear_ttq": "BitLinear_TTQ", "bitlinear_standard": "standard BitLinear"}
TARGET_DROP = 0.02  # BitLinear_TTQ from stage 3 may lose at most this much mAP50-95 against stage 3


def ptq_checkpoint(start: str, cfg, out: Path) -> Path:
    """The start checkpoint with the config's C2PSA stage applied without training (the one post-training path:
    its StagePlan's c2psa QuantSpec), saved in the project's format. Saved as the module tree, as before: TTQ layers
    a stage-3 start already holds are not exported to plain convs here."""
    model, ckpt = load_model(start)
    post_training_model(cfg, [0], model)
    return save_stock_checkpoint(model, out, train_args=ckpt.get("train_args"))


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "epochs", "imgsz", "batch", weights="FP start checkpoint")
    p.add_argument("--stage3", default=str(DEFAULT_STAGE3), help="stage-3 output of the TTQ retention run")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--set", dest="dotlist", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--skip-ptq", action="store_true", help="skip the rows without training")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "c2psa"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "c2psa_retention.json"))
    return p.parse_args()


def chosen_variants(a) -> list[str]:
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    return variants


class Rows:
    """The JSON document at --out, its rows merged by name; every row is written as soon as it exists."""

    def __init__(self, out: Path, dotlist: list[str]):
        self.out, self.dotlist, self.prov = out, dotlist, provenance()
        self.result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "c2psa_retention", "rows": []}

    def add(self, row: dict) -> None:
        p = self.prov
        row.update(date=p["date"], commit=p["commit"], dirty=p["dirty"], command=p["command"],
                   config_overrides=self.dotlist)
        self.result["rows"] = [r for r in self.result["rows"] if r["name"] != row["name"]] + [row]
        write_json(self.result, self.out)
        print(f"[c2psa] {row['name']}: mAP50 {row['mAP50']:.4f}  mAP50-95 {row['mAP50-95']:.4f}", flush=True)


def run_variant(a, v: str, starts: dict, start_map: dict, val, rows: Rows) -> None:
    """One variant: its PTQ row (unless --skip-ptq), then training its C2PSA stage and the trained row."""
    key, mode = VARIANTS[v]
    vdir = Path(a.workdir) / v
    shutil.rmtree(vdir, ignore_errors=True)  # never continue from an earlier run
    cfg = load_config(CONFIGS[mode], {"weights": str(a.weights), "data": str(a.data), "epochs": a.epochs,
                                      "imgsz": a.imgsz, "batch": a.batch, "device": "cpu",
                                      "checkpoint_dir": str(vdir / "checkpoints")}, rows.dotlist)
    label = f"{LABELS[key]} + C2PSA {LABELS[mode]}"
    if not a.skip_ptq:
        m = val(str(ptq_checkpoint(starts[key], cfg, vdir / "ptq.pt")))
        rows.add({"name": f"{label}, no training", "kind": "ptq", "variant": v, "mAP50": m["mAP50"],
                  "mAP50-95": m["mAP50-95"], "delta_vs_start": m["mAP50-95"] - start_map[key]})
    callbacks, times = epoch_timer()
    wall = time.perf_counter()
    train_stages(cfg, [1], start=starts[key], callbacks=callbacks)
    wall = time.perf_counter() - wall
    outputs = stage_outputs(cfg, cfg.stages[0])
    m = val(str(outputs.ternary))
    rows.add({"name": label, "kind": "trained", "variant": v, "mAP50": m["mAP50"], "mAP50-95": m["mAP50-95"],
              "delta_vs_start": m["mAP50-95"] - start_map[key], "epochs": a.epochs,
              "sec_per_epoch": mean_time(times), "wall_s": wall, "export": str(outputs.ternary)})


def report(result: dict, out: Path) -> None:
    """The stage-3 BitLinear_TTQ target (when that row exists), the final JSON and the table."""
    s3 = next((r for r in result["rows"] if r["name"] == "stage 3 + C2PSA BitLinear_TTQ"), None)
    if s3 is not None:
        result["target"] = {"max_drop_vs_stage3": TARGET_DROP, "drop": -s3["delta_vs_start"],
                            "met": -s3["delta_vs_start"] <= TARGET_DROP}
    write_json(result, out)
    print()
    print_table(result["rows"], [("name", "model", "s"), ("mAP50", "mAP50", ".4f"), ("mAP50-95", "mAP50-95", ".4f"),
                                 ("delta_vs_start", "vs start", "+.4f"), ("sec_per_epoch", "s/epoch", ".1f")])
    if "target" in result:
        t = result["target"]
        print(f"\ntarget (BitLinear_TTQ from stage 3 loses <= {TARGET_DROP}): drop {t['drop']:.4f} -> "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"\nJSON: {out}")


def main() -> None:
    a = parse_args()
    variants = chosen_variants(a)
    a.weights, a.data = require(a.weights, "weights"), require(a.data, "data yaml")
    starts = {"fp": str(a.weights)}
    if any(VARIANTS[v][0] == "stage3" for v in variants):
        starts["stage3"] = str(require(a.stage3, "stage-3 checkpoint (run benchmarks/ttq_retention.py first)"))
    val = partial(validate, data=str(a.data), imgsz=a.imgsz, batch=16, device="cpu",
                  project=str(Path(a.workdir) / "val"))
    rows = Rows(Path(a.out), ["train.ultralytics.nbs=16", *a.dotlist])  # nbs = batch: no gradient accumulation
    rows.result["budget"] = {"weights": str(a.weights), "data": str(a.data), "epochs": a.epochs, "imgsz": a.imgsz,
                             "batch": a.batch, "nbs": 16, "device": "cpu"}
    start_map = {}
    for key in dict.fromkeys(VARIANTS[v][0] for v in variants):
        m = val(starts[key])
        start_map[key] = m["mAP50-95"]
        rows.add({"name": f"{LABELS[key]} (start)", "kind": "start", "start": starts[key], "mAP50": m["mAP50"],
                  "mAP50-95": m["mAP50-95"]})
    for v in variants:
        run_variant(a, v, starts, start_map, val, rows)
    report(rows.result, rows.out)


if __name__ == "__main__":
    main()
