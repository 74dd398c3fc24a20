#!/usr/bin/env python
"""List which layers of a checkpoint are ternary, judged from the weights themselves (not from metadata).

  python test.py checkpoints/yolo11n/stage3/ternary.pt [--only-ternary] [--json OUT]
"""

import argparse
import json

from src.cli import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--only-ternary", action="store_true", help="print only the ternary layers")
    p.add_argument("--json", help="also write rows and totals to this JSON file")
    a = p.parse_args()

    from src.checkpoints import load_model
    from src.report import conv_rows, format_report, totals

    model, _ = load_model(a.checkpoint)
    rows = conv_rows(model)
    tot = totals(model, rows)
    print(format_report(rows, tot, a.only_ternary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"checkpoint": a.checkpoint, "rows": rows, "totals": tot}, f, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
