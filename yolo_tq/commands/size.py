"""Model size of a ternary checkpoint against its FP baseline: theoretical ratios, coverage, real bytes; and the
packed ternary file (safetensors, no pickle) with its loader.

  yolo-tq size --baseline yolo11n.pt --quantized checkpoints/yolo11n/stage3/ternary.pt
  yolo-tq size --baseline yolo11n.pt --quantized stage3/ternary.pt --pack stage3.tq.safetensors \\
      --unpacked-pt stage3_unpacked.pt --val-data coco128.yaml --imgsz 320
  yolo-tq size --unpack stage3.tq.safetensors --unpacked-pt stage3_unpacked.pt

(python compression_calculation.py takes the same flags.) Ternary layers are judged from the weights. --quantized
takes a training checkpoint (TTQConv2d layers) or a stock ternary export (plain convs holding three values).
Theoretical sizes: baseline at 32 (or 16) bits per parameter, quantized model at 2 (or log2 3) bits per ternary
weight and 32 (or 16) bits per other parameter. Real bytes: the baseline .pt, the stock ternary export .pt, and the
packed file with INT8 and with FP16 for the non-ternary weights.

Packed file: ternary weights as base-3 codes (5 per byte) with Wp/Wn per layer; other weights INT8 per output
channel (symmetric) or FP16 with --rest fp16 (or --pack-fp16); biases and BatchNorm (as a per-channel scale and shift) FP16;
BitLinear layers (C2PSA) as ternary codes plus FP16 LayerNorm/out_scale; one safetensors tensor per entry, and
metadata (yaml, class names, stride, BitLinear settings) as JSON in the header. See yolo_tq/formats/packed.py.
Packing checks the round trip (ternary tensors identical, INT8 within half a step).
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .args import add_rest_args, data_path, imgsz_arg, input_file, output_path, positive_int

    p.add_argument("--baseline", type=input_file, help="FP checkpoint (.pt) the ratios are measured against")
    p.add_argument("--quantized", type=input_file,
                   help="ternary checkpoint: training checkpoint or stock ternary export (.pt)")
    p.add_argument("--json", type=output_path,
                   help="write the full report (per-layer rows, totals, sizes) to this JSON file")
    p.add_argument("--pack", metavar="OUT", type=output_path,
                   help="also write the packed ternary file (.safetensors) here")
    add_rest_args(p)
    p.add_argument("--unpack", metavar="PACKED", type=input_file, help="read a packed file instead (no --baseline/"
                   "--quantized): check it loads; with --unpacked-pt write the unpacked model")
    p.add_argument("--unpacked-pt", metavar="OUT", type=output_path,
                   help="write the unpacked model as an ordinary Ultralytics .pt")
    p.add_argument("--val-data", metavar="DATA", type=data_path,
                   help="validate the quantized checkpoint and the unpacked model "
                   "on this Ultralytics data yaml (needs --pack or --unpack)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="validation image size, a multiple of 32 (default 640)")
    p.add_argument("--batch", type=positive_int, default=16, help="validation batch size (default 16)")
    p.add_argument("--device", default=None, help="validation device: cpu, 0, ...")


def argument_problem(a: argparse.Namespace) -> str | None:
    """What is wrong with a combination of flags, if anything."""
    if a.unpack and (a.baseline or a.quantized or a.pack):
        return "--unpack reads a packed file; it takes no --baseline, --quantized or --pack"
    if not a.unpack and not (a.baseline and a.quantized):
        return "give --baseline and --quantized (or --unpack PACKED)"
    if a.rest and not a.pack:
        return "--rest (--pack-fp16) needs --pack OUT"
    if (a.unpacked_pt or a.val_data) and not (a.pack or a.unpack):
        return "--unpacked-pt and --val-data need --pack or --unpack"
    return None


def size_and_pack(a: argparse.Namespace) -> dict:
    """The size report of --baseline/--quantized, printed; with --pack, the packed file written and checked."""
    from ..eval.size import format_size_report, load_pair, packed_sizes, real_file_sizes, round_trip_line, size_report
    from ..formats.packed import write_verified

    baseline, quantized, stock = load_pair(a.baseline, a.quantized)
    report = {"baseline_checkpoint": a.baseline, "quantized_checkpoint": a.quantized,
              **size_report(baseline, quantized)}
    packed = packed_sizes(stock, os.path.basename(a.quantized))
    report["files"] = real_file_sizes(a.baseline, a.quantized, quantized, stock, packed)
    print(format_size_report(report))
    if a.pack:
        rest = a.rest or "int8"
        check = write_verified(stock, a.pack, rest, data=packed[rest])
        report["packed"] = {"path": str(a.pack), "bytes": os.path.getsize(a.pack), "rest": rest,
                            "round_trip": check}
        print("\n" + round_trip_line(a.pack, rest, check))
    return report


def run(a: argparse.Namespace) -> int:
    from ..io import check_writable
    from .args import UsageError
    from ..eval.size import describe_packed, format_packed, validate_unpacked
    from ..io import write_json

    problem = argument_problem(a)
    if problem:
        raise UsageError(problem)
    outputs = ((a.json, "the report JSON"), (a.pack, "the packed file"), (a.unpacked_pt, "the unpacked .pt"))
    for path, what in outputs:
        if path:
            check_writable(path, what, inputs=[a.baseline, a.quantized, a.unpack, a.val_data])
    if a.unpack:
        report = {"packed": describe_packed(a.unpack)}
        print(format_packed(report["packed"]))
    else:
        report = size_and_pack(a)
    packed_path = a.unpack or a.pack
    if packed_path and (a.unpacked_pt or a.val_data):
        rows = validate_unpacked(packed_path, a.unpacked_pt, a.val_data, a.imgsz, a.batch, a.device,
                                 None if a.unpack else a.quantized)
        if a.unpacked_pt:
            print(f"unpacked model written to {a.unpacked_pt}")
        if rows:
            report["validation"] = rows
        for name, r in rows.items():
            print(f"{name:<15} mAP50 {r['mAP50']:.4f}  mAP50-95 {r['mAP50-95']:.4f}")
    if a.json:
        print(f"JSON: {write_json(report, a.json)}")
    return 0
