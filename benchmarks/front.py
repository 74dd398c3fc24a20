#!/usr/bin/env python
"""Accuracy-size front: every plan under configs/plans/ trained on the retention budget (10 epochs per stage,
batch 16, 128 coco128 train images, trained at 640), each seed; each plan's result is its deployable ONNX (bytes
on disk) and the mAP50-95 stock Ultralytics reads from that file at 320 and 640 (onnxruntime, batch 1). The FP
model and Ultralytics' own OpenVINO INT8 export are measured beside them. Writes JSON and front.png.

Stages are shared: a stage is trained once per seed under its name (plans/*.yaml give a name to one stage after
the same stages; this script refuses two plans that disagree on what a name means), so plans with the same first
stages share those checkpoints. Re-running continues: finished stages and measured rows are kept; an
interrupted stage resumes from its last.pt.

  python benchmarks/front.py --seeds 0 1 --out benchmarks/results/front.json
  python benchmarks/front.py --train-only --plans configs/plans/int4.yaml --seeds 0
  python benchmarks/front.py --merge core0.json core1.json --out benchmarks/results/front.json   (one run per core)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BENCH_SETTINGS, REPO, parser, print_table, provenance, require

from yolo_tq.config import load_config, stage_outputs, stage_plan
from yolo_tq.io import write_json

PLANS = REPO / "configs" / "plans"


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "epochs", "batch", "device")
    p.add_argument("--imgsz", type=int, default=640, help="training image size (the configs' own)")
    p.add_argument("--val-imgsz", type=int, nargs="+", default=[320, 640], help="validation sizes of every point")
    p.add_argument("--plans", nargs="+", default=None, help="plan configs (default: configs/plans/*.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-only", action="store_true", help="train the plans' stages; measure nothing")
    p.add_argument("--measure-only", action="store_true",
                   help="train nothing: measure the plans whose stages are all trained, skip the others")
    p.add_argument("--no-references", action="store_true", help="skip the FP and OpenVINO INT8 points")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "front"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "front.json"))
    p.add_argument("--plot", default=None, help="front.png path (default: next to --out)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train and measure nothing: add the rows and training records of these front JSONs (runs "
                        "made one per core) to --out, then write its table and plot")
    return p.parse_args()


def plan_files(a) -> list[Path]:
    files = [Path(f) for f in a.plans] if a.plans else sorted(PLANS.glob("*.yaml"))
    return [require(f, "plan config") for f in files]


def load_plan(path: Path, a, seed: int):
    return load_config(path, {"weights": str(a.weights), "data": str(a.data), "epochs": a.epochs, "imgsz": a.imgsz,
                              "batch": a.batch, "device": a.device,
                              "checkpoint_dir": str(Path(a.workdir) / f"s{seed}" / "checkpoints")},
                       BENCH_SETTINGS + [f"train.seed={seed}"])


def stage_keys(cfg) -> list[str]:
    """What each stage is, after the stages before it (its plan and theirs), as a comparable string."""
    keys, before = [], []
    for s in cfg.stages:
        before.append(repr(stage_plan(cfg, s)))
        keys.append(" | ".join(before))
    return keys


def check_shared_names(plans: dict) -> dict[str, list[str]]:
    """Stage name -> the plans that share it; refuses a name that means different stages in two plans."""
    meaning, users = {}, {}
    for name, cfg in plans.items():
        for stage, key in zip(cfg.stages, stage_keys(cfg)):
            if meaning.setdefault(stage.name, (key, name))[0] != key:
                raise SystemExit(f"error: stage '{stage.name}' means different stages in plans "
                                 f"{meaning[stage.name][1]} and {name}; give one of them another name")
            users.setdefault(stage.name, []).append(name)
    return users


def train_plan_stages(cfg, log: dict, save=lambda: None) -> list[str]:
    """Train the plan's stages that are not done (resuming an interrupted one); the checkpoints it used. `save` runs
    after each trained stage, so a run stopped in a later stage keeps the earlier ones' records."""
    from yolo_tq.train.stages import train_stages

    used = []
    for n, stage in enumerate(cfg.stages, 1):
        out = stage_outputs(cfg, stage)
        used.append(str(out.ternary))
        if out.ternary.is_file():
            continue
        resume = out.last.is_file()
        print(f"[front] training {stage.name} ({'resumed' if resume else 'from the start'})", flush=True)
        t0 = time.perf_counter()
        train_stages(cfg, [n], resume=resume)
        log[stage.name] = {"wall_s": time.perf_counter() - t0, "resumed": resume, "provenance": provenance()}
        save()
    return used


def measure(ckpt: str, name: str, a, work: Path, plain: dict | None = None) -> dict:
    """The deployable ONNX of a checkpoint: bytes, and mAP50-95 read from it by stock Ultralytics at each size.
    `plain`, if given, receives the same of the plain FP32 ONNX it was made from."""
    from yolo_tq.deploy.deployable import export_deployable
    from yolo_tq.eval.validate import validate

    row = {"bytes": None}
    for size in a.val_imgsz:
        d = work / name / str(size)
        r = export_deployable(ckpt, d / "deploy.onnx", size, "int8", workdir=d / "work", data=str(a.data),
                              log=lambda s: None)
        row.update(bytes=r.bytes, encoding=r.encoding)
        row[f"mAP50-95@{size}"] = validate(str(d / "deploy.onnx"), str(a.data), size, 1, "cpu")["mAP50-95"]
        if plain is not None:
            plain.update(bytes=r.fp_onnx_bytes)
            plain[f"mAP50-95@{size}"] = validate(r.fp_onnx, str(a.data), size, 1, "cpu")["mAP50-95"]
    return row


def references(a, work: Path) -> list[dict]:
    """The FP model as its plain FP32 ONNX and as the deployable ONNX (every conv INT8 per channel, as every plan's
    rest), and Ultralytics' own OpenVINO INT8 export (weights and activations), each at --val-imgsz."""
    from yolo_tq.deploy.reference import int8_reference

    fp32 = {"plan": "FP32 ONNX", "seed": None}
    rows = [{"plan": "FP weights INT8 (deployable)", "seed": None, **measure(str(a.weights), "fp", a, work, fp32)},
            fp32]
    ref = {"plan": "Ultralytics OpenVINO INT8", "seed": None}
    for size in a.val_imgsz:
        r = int8_reference(str(a.weights), str(a.data), size, work / "int8" / str(size))
        if r["status"] != "ok":
            raise SystemExit(f"error: the OpenVINO INT8 reference {r['status']}: {r.get('reason')}")
        ref["bytes"], ref[f"mAP50-95@{size}"] = r["bytes"], r["mAP50-95"]
    return rows + [ref]


def merge_results(result: dict, others: list[dict]) -> dict:
    """`result` with the rows and training records of `others` added; a plan and seed measured twice must read the
    same bytes and mAPs (kept once), a stage trained twice under one seed is refused."""
    figures = lambda r: {k: v for k, v in r.items() if k == "bytes" or k.startswith("mAP50-95@")}
    trained_on = lambda r: {k: v for k, v in r.get("budget", {}).items() if k != "seeds"}  # files differ in seeds
    for other in others:
        budget, mine = trained_on(other), trained_on(result)
        if budget and mine and mine != budget:
            raise SystemExit(f"error: the files were trained on different budgets: {mine} and {budget}")
        if budget or mine:
            result["budget"] = mine or budget
        for row in other["rows"]:
            same = [r for r in result["rows"] if (r["plan"], r["seed"]) == (row["plan"], row["seed"])]
            if same and figures(same[0]) != figures(row):
                raise SystemExit(f"error: {row['plan']} seed {row['seed']} reads {figures(row)} in one file and "
                                 f"{figures(same[0])} in another; measure it once")
            if not same:
                result["rows"].append(row)
        for seed, stages in other.get("training", {}).items():
            mine = result["training"].setdefault(seed, {})
            for stage in set(stages) & set(mine):
                if stages[stage] != mine[stage]:
                    raise SystemExit(f"error: stage {stage} of {seed} was trained in two runs; keep one")
            mine.update(stages)
    return result


def main() -> None:
    a = parse_args()
    if a.merge:
        out = Path(a.out)
        if any(Path(f).resolve() == out.resolve() for f in a.merge):
            raise SystemExit(f"error: --out {out} is one of the --merge files; --out is the file they are added to")
        result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "front", "rows": [], "training": {}}
        merge_results(result, [json.loads(Path(require(f, "front JSON")).read_text()) for f in a.merge])
        result["merged_from"] = sorted(set(result.get("merged_from", [])) | {str(f) for f in a.merge})
        return finish(result, a, out)
    a.weights, a.data = require(a.weights, "weights"), require(a.data, "data yaml")
    files = plan_files(a)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "front", "rows": [], "training": {}}
    result.update(provenance=provenance(), plans=[str(f.relative_to(REPO)) for f in files],
                  budget={"epochs_per_stage": a.epochs, "batch": a.batch, "imgsz": a.imgsz, "seeds": a.seeds})
    for seed in a.seeds:
        plans = {f.stem: load_plan(f, a, seed) for f in files}
        result["shared_stages"] = check_shared_names(plans)
        for name, cfg in plans.items():
            if a.measure_only and not all(stage_outputs(cfg, s).ternary.is_file() for s in cfg.stages):
                print(f"[front] {name} seed {seed}: not trained yet, skipped (--measure-only)", flush=True)
                continue
            used = train_plan_stages(cfg, result["training"].setdefault(f"s{seed}", {}), lambda: write_json(result, out))
            if a.train_only or any(r["plan"] == name and r["seed"] == seed for r in result["rows"]):
                continue
            row = {"plan": name, "seed": seed, "checkpoints": used,
                   **measure(used[-1], f"{name}_s{seed}", a, Path(a.workdir) / "measure"), "provenance": provenance()}
            result["rows"].append(row)
            write_json(result, out)
            print(f"[front] {name} seed {seed}: {row['bytes']:,} B, " +
                  ", ".join(f"@{s} {row[f'mAP50-95@{s}']:.4f}" for s in a.val_imgsz), flush=True)
    if not a.train_only and not a.no_references and not any(r["seed"] is None for r in result["rows"]):
        result["rows"].extend(references(a, Path(a.workdir) / "measure"))
        write_json(result, out)
    if not a.train_only:
        finish(result, a, out)


def finish(result: dict, a, out: Path) -> None:
    from front_plot import plot_front, summarize

    summary = summarize(result["rows"], a.val_imgsz)
    result["summary"] = summary
    write_json(result, out)
    print_table(summary, [("plan", "plan", "s"), ("MB", "MB", ".3f"),
                          *[(f"mean@{s}", f"mAP@{s}", ".4f") for s in a.val_imgsz],
                          *[(f"seeds@{s}", f"seeds@{s}", "s") for s in a.val_imgsz]])
    png = plot_front(summary, max(a.val_imgsz), Path(a.plot) if a.plot else out.with_suffix(".png"))
    print(f"JSON: {out}\nplot: {png}")


if __name__ == "__main__":
    main()
