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
from pathlib import Path

from common import REPO, SHARED_DATA, SHARED_WEIGHTS, print_table, provenance, require, write_json

DEFAULT_STAGE3 = REPO / "benchmarks" / "work" / "retention" / "checkpoints" / "yolo11n" / "stage3" / "weights" / "best.pt"
VARIANTS = {"fp_ttq": ("fp", "bitlinear_ttq"), "fp_standard": ("fp", "bitlinear_standard"),
            "s3_ttq": ("stage3", "bitlinear_ttq"), "s3_standard": ("stage3", "bitlinear_standard")}
CONFIGS = {"bitlinear_ttq": REPO / "configs" / "stage2_c2psa.yaml",
           "bitlinear_standard": REPO / "configs" / "stage2_c2psa_standard.yaml"}
LABELS = {"fp": "FP", "stage3": "stage 3", "bitlinear_ttq": "BitLinear_TTQ", "bitlinear_standard": "standard BitLinear"}
TARGET_DROP = 0.02  # BitLinear_TTQ from stage 3 may lose at most this much mAP50-95 against stage 3


def ptq_checkpoint(start: str, mode: str, cfg, out: Path) -> Path:
    """The start checkpoint with its C2PSA replaced (no training), saved in the project's format."""
    from src.checkpoints import load_model, save_stock_checkpoint
    from src.quantization.c2psa_replace import replace_c2psa

    model, ckpt = load_model(start)
    q = cfg.quantization
    replace_c2psa(model, mode, threshold=cfg.stages[0].threshold, act_bits=q.act_bits, per_token=q.act_per_token,
                  rule=q.threshold_rule, scale_grad=q.scale_grad)
    return save_stock_checkpoint(model, out, train_args=ckpt.get("train_args"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(SHARED_WEIGHTS), help="FP start checkpoint")
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--stage3", default=str(DEFAULT_STAGE3), help="stage-3 output of the TTQ retention run")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--set", dest="dotlist", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--skip-ptq", action="store_true", help="skip the rows without training")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "c2psa"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "c2psa_retention.json"))
    a = p.parse_args()

    from src.config import load_config
    from src.evaluation import validate
    from src.training.stages import stage_outputs, train_stage

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    starts = {"fp": str(weights)}
    if any(VARIANTS[v][0] == "stage3" for v in variants):
        starts["stage3"] = str(require(a.stage3, "stage-3 checkpoint (run benchmarks/ttq_retention.py first)"))
    work = Path(a.workdir)
    dotlist = ["train.ultralytics.nbs=16", *a.dotlist]  # nbs = batch: no gradient accumulation up to 64
    val = lambda ckpt: validate(ckpt, str(data), a.imgsz, 16, "cpu", project=str(work / "val"))  # noqa: E731

    out = Path(a.out)
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "c2psa_retention", "rows": []}
    result["budget"] = {"weights": str(weights), "data": str(data), "epochs": a.epochs, "imgsz": a.imgsz,
                        "batch": a.batch, "nbs": 16, "device": "cpu"}
    prov = provenance()

    def add(row):
        row.update(date=prov["date"], commit=prov["commit"], dirty=prov["dirty"], command=prov["command"],
                   config_overrides=dotlist)
        result["rows"] = [r for r in result["rows"] if r["name"] != row["name"]] + [row]
        write_json(result, out)
        print(f"[c2psa] {row['name']}: mAP50 {row['mAP50']:.4f}  mAP50-95 {row['mAP50-95']:.4f}", flush=True)

    start_map = {}
    for key in dict.fromkeys(VARIANTS[v][0] for v in variants):
        m = val(starts[key])
        start_map[key] = m["mAP50-95"]
        add({"name": f"{LABELS[key]} (start)", "kind": "start", "start": starts[key], "mAP50": m["mAP50"],
             "mAP50-95": m["mAP50-95"]})

    for v in variants:
        key, mode = VARIANTS[v]
        vdir = work / v
        shutil.rmtree(vdir, ignore_errors=True)  # never continue from an earlier run
        cfg = load_config(CONFIGS[mode], {"weights": str(weights), "data": str(data), "epochs": a.epochs,
                                          "imgsz": a.imgsz, "batch": a.batch, "device": "cpu",
                                          "checkpoint_dir": str(vdir / "checkpoints")}, dotlist)
        label = f"{LABELS[key]} + C2PSA {LABELS[mode]}"
        if not a.skip_ptq:
            m = val(str(ptq_checkpoint(starts[key], mode, cfg, vdir / "ptq.pt")))
            add({"name": f"{label}, no training", "kind": "ptq", "variant": v, "mAP50": m["mAP50"],
                 "mAP50-95": m["mAP50-95"], "delta_vs_start": m["mAP50-95"] - start_map[key]})
        times: list[float] = []
        t0 = {}
        cbs = {"on_train_epoch_start": lambda tr: t0.__setitem__("t", time.perf_counter()),
               "on_train_epoch_end": lambda tr: times.append(time.perf_counter() - t0["t"])}
        wall = time.perf_counter()
        train_stage(cfg, 1, start=starts[key], callbacks=cbs)
        wall = time.perf_counter() - wall
        outputs = stage_outputs(cfg, cfg.stages[0])
        m = val(str(outputs["ternary"]))
        add({"name": label, "kind": "trained", "variant": v, "mAP50": m["mAP50"], "mAP50-95": m["mAP50-95"],
             "delta_vs_start": m["mAP50-95"] - start_map[key], "epochs": a.epochs,
             "sec_per_epoch": sum(times) / max(len(times), 1), "wall_s": wall, "export": str(outputs["ternary"])})

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


if __name__ == "__main__":
    main()
