#!/usr/bin/env python
"""Model size of a ternary checkpoint against its FP baseline: theoretical ratios, coverage, real bytes; and the
packed ternary file (safetensors, no pickle) with its loader.

  python compression_calculation.py --baseline yolo11n.pt --quantized checkpoints/yolo11n/stage3/ternary.pt
  python compression_calculation.py --baseline yolo11n.pt --quantized stage3/ternary.pt --pack stage3.tq.safetensors \\
      --unpacked-pt stage3_unpacked.pt --val-data coco128.yaml --imgsz 320
  python compression_calculation.py --unpack stage3.tq.safetensors --unpacked-pt stage3_unpacked.pt

Ternary layers are judged from the weights. --quantized takes a training checkpoint (TTQConv2d layers) or a stock
ternary export (plain convs holding three values). Theoretical sizes: baseline at 32 (or 16) bits per parameter,
quantized model at 2 (or log2 3) bits per ternary weight and 32 (or 16) bits per other parameter. Real bytes: the
baseline .pt, the stock ternary export .pt, and the packed file with INT8 and with FP16 for the non-ternary weights.

Packed file: ternary weights as base-3 codes (5 per byte) with Wp/Wn per layer; other weights INT8 per output
channel (symmetric) or FP16 with --pack-fp16; biases and BatchNorm (as a per-channel scale and shift) FP16;
BitLinear layers (C2PSA) as ternary codes plus FP16 LayerNorm/out_scale; metadata (yaml, class names, stride,
per-tensor precision, BitLinear settings) as JSON in the safetensors header. See
src/quantization/packing.py. Packing checks the round trip (ternary tensors identical, INT8 within half a step).
"""

import argparse

from src.cli import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="FP checkpoint (.pt) the ratios are measured against")
    p.add_argument("--quantized", help="ternary checkpoint: training checkpoint or stock ternary export (.pt)")
    p.add_argument("--json", help="write the full report (per-layer rows, totals, sizes) to this JSON file")
    p.add_argument("--pack", metavar="OUT", help="also write the packed ternary file (.safetensors) here")
    p.add_argument("--pack-fp16", action="store_true",
                   help="with --pack: store the non-ternary weights as FP16 instead of INT8 per output channel")
    p.add_argument("--unpack", metavar="PACKED", help="read a packed file instead (no --baseline/--quantized): "
                   "check it loads; with --unpacked-pt write the unpacked model")
    p.add_argument("--unpacked-pt", metavar="OUT", help="write the unpacked model as an ordinary Ultralytics .pt")
    p.add_argument("--val-data", metavar="DATA", help="validate the quantized checkpoint and the unpacked model "
                   "on this Ultralytics data yaml (needs --pack or --unpack)")
    p.add_argument("--imgsz", type=int, default=640, help="validation image size (default 640)")
    p.add_argument("--batch", type=int, default=16, help="validation batch size (default 16)")
    p.add_argument("--device", default=None, help="validation device: cpu, 0, ...")
    a = p.parse_args()
    if a.unpack and (a.baseline or a.quantized or a.pack):
        p.error("--unpack reads a packed file; it takes no --baseline, --quantized or --pack")
    if not a.unpack and not (a.baseline and a.quantized):
        p.error("give --baseline and --quantized (or --unpack PACKED)")
    if a.pack_fp16 and not a.pack:
        p.error("--pack-fp16 needs --pack OUT")
    if (a.unpacked_pt or a.val_data) and not (a.pack or a.unpack):
        p.error("--unpacked-pt and --val-data need --pack or --unpack")

    import os
    import tempfile

    from src.compression import format_size_report, load_pair, size_report, stock_export_bytes, write_json
    from src.evaluation import validate
    from src.quantization import packing

    report: dict = {}
    if a.unpack:
        tensors, meta = packing.read_packed(a.unpack)
        packing.model_from_packed(tensors, meta, source=a.unpack)
        tags = packing.precisions(meta)
        print(f"{a.unpack}: {os.path.getsize(a.unpack):,} bytes, {meta['model_class']} "
              f"(nc={meta['nc']}), ternary layers {meta['ternary_layers']}, "
              f"{sum(t == 'ternary' for t in tags.values())} ternary tensors, rest {meta['rest_precision']}")
        report["packed"] = {"path": a.unpack, "bytes": os.path.getsize(a.unpack),
                            **{k: v for k, v in meta.items() if k not in ("tensors", "yaml")}}
        packed_path, source_ckpt = a.unpack, None
    else:
        baseline, quantized, stock = load_pair(a.baseline, a.quantized)
        report = {"baseline_checkpoint": a.baseline, "quantized_checkpoint": a.quantized,
                  **size_report(baseline, quantized)}
        packed = {rest: packing.pack_bytes(stock, rest, source=os.path.basename(a.quantized))
                  for rest in packing.REST_PRECISIONS}
        report["files"] = {
            "baseline_pt": os.path.getsize(a.baseline),
            "stock_ternary_export_pt": stock_export_bytes(a.quantized, quantized, stock),
            "packed_ternary_int8_rest": len(packed["int8"]),
            "packed_ternary_fp16_rest": len(packed["fp16"]),
        }
        print(format_size_report(report))
        packed_path, source_ckpt = None, a.quantized
        if a.pack:
            rest = "fp16" if a.pack_fp16 else "int8"
            packed_path = packing.save_packed_bytes(packed[rest], a.pack)
            tensors, meta = packing.read_packed(packed_path)
            check = packing.verify_round_trip(stock, packing.model_from_packed(tensors, meta), meta)
            if not check["ok"]:
                raise packing.PackError(f"round trip failed: {check}")
            report["packed"] = {"path": str(packed_path), "bytes": os.path.getsize(packed_path), "rest": rest,
                                "round_trip": check}
            print(f"\npacked: {packed_path} ({os.path.getsize(packed_path):,} bytes, rest {rest}); round trip: "
                  f"{check['ternary_identical']}/{check['ternary']} ternary tensors identical, INT8 max error "
                  f"{check['int8_max_err_steps']:.3f} step, FP16 max rel. error {check['fp16_max_rel_err']:.1e}")

    if packed_path is not None and (a.unpacked_pt or a.val_data):
        with tempfile.TemporaryDirectory() as tmp:
            pt = a.unpacked_pt or os.path.join(tmp, "unpacked.pt")
            packing.unpack_to_checkpoint(packed_path, pt)
            if a.unpacked_pt:
                print(f"unpacked model written to {pt}")
            if a.val_data:
                rows = {"unpacked": validate(pt, a.val_data, a.imgsz, a.batch, a.device)}
                if source_ckpt:
                    rows["before_packing"] = validate(source_ckpt, a.val_data, a.imgsz, a.batch, a.device)
                report["validation"] = rows
                for name, r in rows.items():
                    print(f"{name:<15} mAP50 {r['mAP50']:.4f}  mAP50-95 {r['mAP50-95']:.4f}")
    if a.json:
        print(f"JSON: {write_json(report, a.json)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
