"""One table for the FP baseline, BitLinear_TTQ and standard BitLinear: mAP50, mAP50-95, precision, recall,
parameters, file size and theoretical compression against the baseline (FP32 baseline, 2 bits per ternary weight,
32 bits per other parameter).

  python compare_bitlinear.py --baseline yolo11n.pt \\
      --ttq checkpoints/yolo11n/c2psa_bitlinear_ttq/ternary.pt \\
      --standard checkpoints/yolo11n/c2psa_bitlinear_standard/ternary.pt --data coco.yaml
"""

from __future__ import annotations

import argparse

from ..cli import check_writable, imgsz_arg, input_file, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flag, what in (("--baseline", "FP (or stage-3) checkpoint to compare against"),
                       ("--ttq", "checkpoint trained with BitLinear_TTQ (train_c2psa.py)"),
                       ("--standard", "checkpoint trained with standard BitLinear")):
        p.add_argument(flag, required=True, type=input_file, help=what)
    p.add_argument("--data", required=True, help="Ultralytics data yaml (name or path)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="a multiple of 32 (default: 640)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, ...")
    p.add_argument("--json", default="runs/compare_bitlinear/compare_bitlinear.json", help="JSON output")
    p.add_argument("--csv", default="runs/compare_bitlinear/compare_bitlinear.csv", help="CSV output")


def run(a: argparse.Namespace) -> int:
    from ..eval.compare import compare_checkpoints, format_table, write_rows

    check_writable(a.json, "the JSON table")
    check_writable(a.csv, "the CSV table")
    entries = [("baseline", a.baseline), ("BitLinear_TTQ", a.ttq), ("standard BitLinear", a.standard)]
    rows = compare_checkpoints(entries, a.data, a.imgsz, a.batch, a.device)
    print(format_table(rows))
    write_rows(rows, a.json, a.csv, meta={"data": a.data, "imgsz": a.imgsz, "batch": a.batch})
    print(f"\nJSON: {a.json}\nCSV: {a.csv}")
    return 0
