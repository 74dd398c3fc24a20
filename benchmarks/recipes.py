#!/usr/bin/env python
"""Both recipes on the retention budget, through the same trainer: the original YOLO11-TQ recipe
(configs/original/*.yaml) and ours (configs/stage1_progressive.yaml, configs/stage2_c2psa*.yaml).

Budget as benchmarks/ttq_retention.py: ../shared yolo11n, 128 coco128 train / 128 val images, imgsz 320, batch 16
(nbs 16: one optimizer step per batch), CPU, --epochs per stage (10). Rows (--rows):
  s1, s12, s123    progressive stages 1, 1-2, 1-3 (cumulative, each from the previous stage's best.pt)
  s123_ttq         C2PSA BitLinear_TTQ from the stage-3 output of the same recipe
  fp_ttq           C2PSA BitLinear_TTQ alone, from the FP weights
  fp_standard      C2PSA standard BitLinear alone, from the FP weights
Every row is the mAP of the stage's ternary export (from best.pt) on the val half. Each recipe runs as its own
benchmark runs it: ours validates its progressive stages after the last epoch only (common.BENCH_SETTINGS)
and its C2PSA rows every epoch (c2psa_retention); the original recipe validates every epoch, because its best.pt and
its early stopping (patience 4) follow mAP50.

The "original code" column is a reference, not a result of this script: the original code itself on this budget
(Ultralytics 8.3.250), as measured for issue 13. Rows are merged into --out by (recipe, row) as each finishes.

  nice -n 10 python benchmarks/recipes.py --recipes original ours
  nice -n 10 python benchmarks/recipes.py --recipes original --rows s1 s12 --resume
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from c2psa_retention import CONFIGS as OUR_C2PSA_CONFIGS
from common import PROGRESSIVE_CONFIG, REPO, epoch_timer, mean_time, parser, print_table, provenance, require, \
    validate_sizes
from common import BENCH_SETTINGS

from yolo_tq.config import load_config, stage_outputs
from yolo_tq.io import write_json
from yolo_tq.train.stages import train_stages

NBS = "train.ultralytics.nbs=16"  # one optimizer step per batch (both recipes)
ORIGINAL_DIR = REPO / "configs" / "original"
CONFIGS = {"original": {"progressive": ORIGINAL_DIR / "stage1_progressive.yaml",
                        "bitlinear_ttq": ORIGINAL_DIR / "stage2_c2psa.yaml",
                        "bitlinear_standard": ORIGINAL_DIR / "stage2_c2psa_standard.yaml"},
           "ours": {"progressive": PROGRESSIVE_CONFIG, **OUR_C2PSA_CONFIGS}}


@dataclass(frozen=True)
class Row:
    name: str
    config: str  # key of CONFIGS[recipe]
    stage: int  # progressive: stages 1..stage; C2PSA rows: 0
    start: str  # fp | stage3 | previous (the previous progressive stage)
    original_code: float  # the original code's mAP50-95 on this budget (issue 13's reference measurement)


ROWS = {"s1": Row("stage 1", "progressive", 1, "fp", 0.200),
        "s12": Row("stages 1-2", "progressive", 2, "previous", 0.168),
        "s123": Row("stages 1-3", "progressive", 3, "previous", 0.037),
        "s123_ttq": Row("stages 1-3 + BitLinear_TTQ", "bitlinear_ttq", 0, "stage3", 0.040),
        "fp_ttq": Row("BitLinear_TTQ on C2PSA alone, from FP", "bitlinear_ttq", 0, "fp", 0.253),
        "fp_standard": Row("standard BitLinear on C2PSA alone, from FP", "bitlinear_standard", 0, "fp", 0.266)}
PROGRESSIVE_KEYS = ("s1", "s12", "s123")


def settings(recipe: str, row: Row) -> list[str]:
    """The config overrides a row runs with (see the module docstring)."""
    return list(BENCH_SETTINGS) if recipe == "ours" and row.config == "progressive" else [NBS]


def parse_args():
    p = parser(__doc__, "weights", "data", "epochs", "imgsz", "batch", "device")
    p.add_argument("--recipes", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--set", dest="dotlist", action="append", default=[],
                   help="config override KEY=VALUE for every row (after the benchmark's own)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out and every stage that finished (its ternary.pt exists)")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "recipes"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipes.json"))
    return p.parse_args()


def read_rows(out: Path) -> list[dict]:
    return json.loads(out.read_text())["rows"] if out.is_file() else []


def save_row(out: Path, row: dict, meta: dict) -> None:
    """Merge `row` into --out by (recipe, row), reading the file again first (the recipes may run as two processes
    writing the same file)."""
    doc = json.loads(out.read_text()) if out.is_file() else {"benchmark": "recipes", "rows": []}
    doc.update(meta)
    doc["rows"] = [r for r in doc["rows"] if (r["recipe"], r["row"]) != (row["recipe"], row["row"])] + [row]
    write_json(doc, out)
    print(f"[recipes] {row['recipe']}: {row['name']}: mAP50 {row['mAP50']:.4f}  mAP50-95 {row['mAP50-95']:.4f}  "
          f"(original code: {row['original_code']:.3f})", flush=True)


def train_row(cfg, index: int, start: str | None) -> dict:
    """Train one stage of `cfg`; what the row records about the run (epochs run, best epoch, per-epoch mAP when it
    validated every epoch, time)."""
    callbacks, times = epoch_timer()
    epochs, info = [], {}

    def epoch_end(tr):
        if tr.args.val:
            epochs.append({"epoch": tr.epoch + 1, "mAP50": tr.metrics.get("metrics/mAP50(B)"),
                           "mAP50-95": tr.metrics.get("metrics/mAP50-95(B)")})

    callbacks["on_fit_epoch_end"] = epoch_end
    callbacks["on_train_end"] = lambda tr: info.update(best_epoch=tr.stopper.best_epoch, epochs_run=tr.epoch + 1)
    wall = time.perf_counter()
    train_stages(cfg, [index + 1], start=start, callbacks=callbacks)
    trained = [e for e in epochs if e["epoch"] <= len(times)]  # not the final validation of best.pt
    return {**info, "sec_per_epoch": mean_time(times), "wall_s": time.perf_counter() - wall, "per_epoch": trained}


def row_config(a, recipe: str, key: str, work: Path):
    """The row's config: its recipe's file with the budget, the row's settings and --set."""
    row = ROWS[key]
    folder = work / recipe / ("progressive" if row.stage else key) / "checkpoints"
    return load_config(CONFIGS[recipe][row.config],
                       {"weights": str(a.weights), "data": str(a.data), "epochs": a.epochs, "imgsz": a.imgsz,
                        "batch": a.batch, "device": a.device, "checkpoint_dir": str(folder)},
                       settings(recipe, row) + a.dotlist)


def row_start(a, recipe: str, row: Row, work: Path) -> str | None:
    """The checkpoint a row starts from: the FP weights, the same recipe's stage-3 best.pt, or (None) the previous
    progressive stage's, which train_stage finds itself."""
    if row.start == "stage3":
        cfg = row_config(a, recipe, "s123", work)
        return str(stage_outputs(cfg, cfg.stages[2]).best)
    return str(a.weights) if row.start == "fp" else None


def finished(a, recipe: str, key: str, work: Path) -> bool:
    """Whether the row's stage has its ternary export in the workdir."""
    cfg = row_config(a, recipe, key, work)
    row = ROWS[key]
    return stage_outputs(cfg, cfg.stages[row.stage - 1 if row.stage else 0]).ternary.is_file()


def run_row(a, recipe: str, key: str, work: Path, val, meta: dict, done: set) -> None:
    """Train the row's stage unless it finished in an earlier run (--resume), then validate and record it (unless
    recorded before, or a prerequisite stage that --rows did not ask for)."""
    row, out = ROWS[key], Path(a.out)
    if a.resume and key not in a.rows and key in PROGRESSIVE_KEYS and any(
            finished(a, recipe, k, work) for k in PROGRESSIVE_KEYS[PROGRESSIVE_KEYS.index(key) + 1:]):
        return  # a prerequisite whose next stage has finished: not needed again
    cfg = row_config(a, recipe, key, work)
    index = row.stage - 1 if row.stage else 0
    outputs = stage_outputs(cfg, cfg.stages[index])
    run = {} if a.resume and outputs.ternary.is_file() else train_row(cfg, index, row_start(a, recipe, row, work))
    if key not in a.rows or (recipe, key) in done:
        return
    p = provenance()
    save_row(out, {"recipe": recipe, "row": key, "name": row.name, **val(str(outputs.ternary)),
                   "original_code": row.original_code, "config": str(CONFIGS[recipe][row.config]),
                   "config_overrides": settings(recipe, row) + a.dotlist, "epochs": a.epochs, **run,
                   "export": str(outputs.ternary), **{k: p[k] for k in ("date", "commit", "dirty", "command")}},
             meta)


def needed(rows: list[str]) -> list[str]:
    """The rows to run, in order: those asked for, and the progressive stages they start from."""
    deepest = max([ROWS[k].stage for k in rows] + [3 if "s123_ttq" in rows else 0])
    return list(PROGRESSIVE_KEYS[:deepest]) + [k for k in ROWS if k not in PROGRESSIVE_KEYS and k in rows]


def report(out: Path, recipes: list[str]) -> None:
    """One line per row: the original code's figure, each recipe's mAP50-95 here, and the differences."""
    by = {(r["recipe"], r["row"]): r for r in read_rows(out)}
    table = []
    for key, row in ROWS.items():
        line = {"name": row.name, "code": row.original_code}
        for recipe in recipes:
            line[recipe] = by.get((recipe, key), {}).get("mAP50-95")
        if line.get("original") is not None:
            line["vs_code"] = line["original"] - row.original_code
        if line.get("original") is not None and line.get("ours") is not None:
            line["gain"] = line["ours"] - line["original"]
        table.append(line)
    print()
    print_table(table, [("name", "row", "s"), ("code", "original code (reference)", ".3f"),
                        *[(r, f"{r}, here", ".3f") for r in recipes],
                        ("vs_code", "original here - code", "+.3f"), ("gain", "ours - original here", "+.3f")])
    print(f"\nmAP50-95 on the val half. JSON: {out}")


def main() -> None:
    a = parse_args()
    a.weights, a.data = require(a.weights, "weights"), require(a.data, "data yaml")
    work, out = Path(a.workdir), Path(a.out)
    meta = {"budget": {"weights": str(a.weights), "data": str(a.data), "epochs_per_stage": a.epochs,
                       "imgsz": a.imgsz, "batch": a.batch, "nbs": 16, "device": a.device},
            "original_code_note": "original_code: the original code's own mAP50-95 on this budget (issue 13's "
                                  "reference measurements, Ultralytics 8.3.250), not a result of this script"}
    val = partial(validate_sizes, data=str(a.data), sizes=[a.imgsz], device=a.device, project=str(work / "val"))
    done = {(r["recipe"], r["row"]) for r in read_rows(out)} if a.resume else set()
    for recipe in a.recipes:
        if not a.resume:
            shutil.rmtree(work / recipe, ignore_errors=True)  # never continue from an earlier run's stages
        for key in needed(a.rows):
            run_row(a, recipe, key, work, val, meta, done)
    report(out, list(CONFIGS))


if __name__ == "__main__":
    main()
