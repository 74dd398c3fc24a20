"""List which layers of a checkpoint are ternary, judged from the weights themselves (not from metadata).

  python test.py checkpoints/yolo11n/stage3/ternary.pt [--only-ternary] [--json OUT]
  yolo-tq layers CKPT
"""

from __future__ import annotations

import argparse

from ..io import check_writable
from .args import input_file, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=input_file)
    p.add_argument("--only-ternary", action="store_true", help="print only the ternary layers")
    p.add_argument("--json", type=output_path, help="also write rows and totals to this JSON file")


def run(a: argparse.Namespace) -> int:
    from ..eval.layers import conv_rows, format_report, totals
    from ..io import load_model, write_json

    if a.json:
        check_writable(a.json, "the JSON report", inputs=[a.checkpoint])
    model, _ = load_model(a.checkpoint)
    rows = conv_rows(model)
    tot = totals(model, rows)
    print(format_report(rows, tot, a.only_ternary))
    if a.json:
        write_json({"checkpoint": a.checkpoint, "rows": rows, "totals": tot}, a.json)
    return 0
