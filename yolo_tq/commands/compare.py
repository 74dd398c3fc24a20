"""One table for the FP baseline, BitLinear_TTQ and standard BitLinear: mAP50, mAP50-95, precision, recall,
parameters, file size and theoretical compression against the baseline (FP32 baseline, 2 bits per ternary weight,
32 bits per other parameter).

Models by flag, or by position in the original compare_bitlinear.py's order, TTQ STANDARD [BASELINE] (its usage:
`compare_bitlinear.py <ours> <standard>`, the baseline third, default yolo11n.pt); a model given both ways is an
error. As in the original, the baseline defaults to yolo11n.pt and the data to coco.yaml (both downloaded by
Ultralytics when absent; offline, pass local files).

  python compare_bitlinear.py --baseline yolo11n.pt \\
      --ttq checkpoints/yolo11n/c2psa_bitlinear_ttq/ternary.pt \\
      --standard checkpoints/yolo11n/c2psa_bitlinear_standard/ternary.pt --data coco.yaml
  python compare_bitlinear.py checkpoints/yolo11n/c2psa_bitlinear_ttq/weights/best.pt \\
      checkpoints/yolo11n/c2psa_bitlinear_standard/weights/best.pt
"""

from __future__ import annotations

import argparse

from ..io import check_writable
from .args import data_path, imgsz_arg, input_file, output_path, positive_int

MODELS = (("ttq", "TTQ", "checkpoint trained with BitLinear_TTQ (train_c2psa.py)"),
          ("standard", "STANDARD", "checkpoint trained with standard BitLinear (train_c2psa_standard.py)"),
          ("baseline", "BASELINE", "FP (or stage-3) checkpoint to compare against (default: yolo11n.pt)"))
DEFAULT_BASELINE = "yolo11n.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    for dest, metavar, what in MODELS:
        p.add_argument(f"{dest}_pos", nargs="?", type=input_file, metavar=metavar, help=f"{what}; or --{dest}")
    for dest, metavar, what in MODELS:
        p.add_argument(f"--{dest}", type=input_file, metavar=metavar, help=what)
    p.add_argument("--data", type=data_path, default="coco.yaml",
                   help="Ultralytics data yaml, name or path (default: coco.yaml)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="a multiple of 32 (default: 640)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, ...")
    p.add_argument("--json", type=output_path, default="runs/compare_bitlinear/compare_bitlinear.json",
                   help="JSON output")
    p.add_argument("--csv", type=output_path, default="runs/compare_bitlinear/compare_bitlinear.csv", help="CSV output")


def models(a: argparse.Namespace) -> dict:
    """TTQ, STANDARD and BASELINE from their positional argument or flag (one of the two); the baseline defaults to
    yolo11n.pt (downloaded by Ultralytics when it is not a local file)."""
    from ..config import ConfigError
    from ..io import CheckpointError, ensure_weights

    out = {}
    for dest, metavar, _ in MODELS:
        pos, flag = getattr(a, f"{dest}_pos"), getattr(a, dest)
        if pos and flag:
            raise ConfigError(f"{metavar} given twice, as a positional argument ({pos}) and as --{dest} ({flag}): "
                              f"give it one way")
        out[dest] = pos or flag
    for dest, metavar, _ in MODELS[:2]:
        if not out[dest]:
            raise ConfigError(f"missing the {metavar} checkpoint: pass it as --{dest} CKPT or by position "
                              f"(compare_bitlinear.py TTQ STANDARD [BASELINE])")
    try:
        out["baseline"] = out["baseline"] or ensure_weights(DEFAULT_BASELINE)
    except CheckpointError as e:
        raise CheckpointError(f"no BASELINE given, and its default {DEFAULT_BASELINE} is neither here nor "
                              f"downloadable: pass --baseline PATH (or a third positional argument)") from e
    return out


def run(a: argparse.Namespace) -> int:
    from ..eval.compare import compare_checkpoints, format_table, write_rows

    m = models(a)
    inputs = [m["baseline"], m["ttq"], m["standard"], a.data]
    for path, what in ((a.json, "the JSON table"), (a.csv, "the CSV table")):
        if path:
            check_writable(path, what, inputs=inputs)
    entries = [("baseline", m["baseline"]), ("BitLinear_TTQ", m["ttq"]), ("standard BitLinear", m["standard"])]
    rows = compare_checkpoints(entries, a.data, a.imgsz, a.batch, a.device)
    print(format_table(rows))
    write_rows(rows, a.json, a.csv, meta={"data": a.data, "imgsz": a.imgsz, "batch": a.batch})
    print(f"\nJSON: {a.json}\nCSV: {a.csv}")
    return 0
