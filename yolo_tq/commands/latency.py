"""Export a baseline and a quantized (ternary) checkpoint to ONNX Runtime, OpenVINO and TensorRT, check that each
export reproduces the PyTorch model, and time them (mean / median / p95 latency, throughput, peak memory, file size,
quantized/baseline ratios). Targets that cannot run here are skipped with one line saying why.

Ratios: per target, baseline and quantized are timed in alternation in one process (A/B) after an A/A check that
times the baseline against a second copy of itself the same way. The A/B ratio is the paired median over rotation
cycles with its 95% bootstrap interval, and counts only where the A/A reads 1.00 ± --aa-tolerance; elsewhere it
is reported as refused, with the A/A figure. Ratios of the separate per-model runs are shown too.

  python latency_benchmark.py --baseline yolo11n.pt --quantized checkpoints/yolo11n/stage3/ternary.pt \\
      --export-int8 --data coco128.yaml --num-runs 50 --json latency.json
  python latency_benchmark.py --baseline yolo11n.pt --quantized ternary.pt --device 0 --export-fp16 --export-int8 \\
      --data coco128.yaml

--device: like Ultralytics, the GPU when PyTorch sees one (CUDA targets), else the CPU.
CPU targets (--device cpu): torch-cpu, onnxruntime-cpu, openvino-fp32, openvino-bf16 (--export-fp16),
openvino-int8 (--export-int8). CUDA targets (--device 0): torch-cuda, torch-cuda-fp16 (--export-fp16),
onnxruntime-cuda, tensorrt-fp16 (--export-fp16), tensorrt-int8 (--export-int8). INT8 calibrates on the train split
of --data; without --data, on coco128.yaml, as Ultralytics' own INT8 export does (downloaded when missing; offline,
give --data). A bare official --baseline name (yolo11n.pt) is downloaded when missing, as train.py does.
"""

from __future__ import annotations

import argparse
import os

from ..deploy.backends import FAMILIES
from ..deploy.measure import AA_TOLERANCE
from ..eval.agreement import REDUCED_MIN_AGREEMENT
from .args import data_path, imgsz_arg, input_file, nonnegative_int, number_in, output_path, positive_int

DEFAULT_CALIBRATION = "coco128.yaml"  # Ultralytics' own default for INT8 export calibration


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", required=True, type=data_path, help="FP checkpoint (.pt)")
    p.add_argument("--quantized", type=input_file,
                   help="quantized checkpoint: a stock ternary export or a TTQ training checkpoint")
    p.add_argument("--export-fp16", action="store_true",
                   help="also FP16 targets (TensorRT, PyTorch CUDA; OpenVINO BF16)")
    p.add_argument("--export-int8", action="store_true", help="also INT8 targets (OpenVINO on CPU, TensorRT on GPU)")
    p.add_argument("--num-runs", type=positive_int, default=50, help="timed runs per target (default 50)")
    p.add_argument("--warmup", type=nonnegative_int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="a multiple of 32 (default 640)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--device", default=None,
                   help="cpu (CPU targets) or 0 (CUDA targets); default: 0 when PyTorch sees a CUDA GPU, else cpu")
    p.add_argument("--backends", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)} (default all)")
    p.add_argument("--data", type=data_path,
                   help="data yaml: INT8 calibration images (train split) and agreement-check images (val)")
    p.add_argument("--calib-split", default="train", help="split of --data used for INT8 calibration (default train)")
    p.add_argument("--calib-fraction", type=number_in(0, 1, low_open=True), default=1.0,
                   help="fraction of that split to calibrate on, in (0, 1] (default 1)")
    p.add_argument("--map", action="store_true", help="also mAP of each export on the val split of --data (slow)")
    p.add_argument("--openvino-int8-hint", choices=["default", "f32", "bf16"], default="default",
                   help="inference precision of OpenVINO INT8's non-quantized ops (default: OpenVINO's choice, as "
                        "Ultralytics runs it)")
    p.add_argument("--min-agreement", type=number_in(0, 1), default=REDUCED_MIN_AGREEMENT,
                   help="FP16/BF16/INT8 exports: share of PyTorch's sure detections they must reproduce and vice "
                        f"versa (default {REDUCED_MIN_AGREEMENT})")
    p.add_argument("--check-images", type=positive_int, default=8, help="images for the agreement check (default 8)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (peak RSS then not per target)")
    p.add_argument("--no-interleave", action="store_true",
                   help="skip the A/A check and the A/B pass (baseline and quantized in alternation in one "
                        "process)")
    p.add_argument("--aa-tolerance", type=number_in(0), default=AA_TOLERANCE,
                   help=f"a target's A/B ratio counts only when its A/A check reads 1.00 ± this (default "
                        f"{AA_TOLERANCE})")
    p.add_argument("--workdir", type=output_path, help="where exports go (default: a new temporary folder)")
    p.add_argument("--json", type=output_path, help="write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the exporters' output")


def resolved_data(a: argparse.Namespace) -> str | None:
    """--data as a local yaml path; with --export-int8 and no --data, Ultralytics' default calibration set (a note
    line; Ultralytics downloads it when missing, and offline the error names --data)."""
    from ..config import check_dataset

    data = a.data
    if data is None and a.export_int8:
        print(f"note: INT8 calibration on {DEFAULT_CALIBRATION} (Ultralytics' default); --data DATA to use your own")
        data = DEFAULT_CALIBRATION
    if data is None or os.path.isfile(data):
        return data
    return str(check_dataset(data, ("train", "val")).get("yaml_file") or data)


def run(a: argparse.Namespace) -> int:
    from ..io import check_writable, ensure_weights

    inputs = [a.baseline, a.quantized, a.data]
    if a.json:
        check_writable(a.json, "the results JSON", inputs=inputs)
    if a.workdir:
        check_writable(a.workdir, "the exports folder", folder=True, inputs=inputs)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ..deploy.bench import BenchOptions, run_benchmark
    from ..deploy.results import format_table, save_record

    opts = BenchOptions(
        baseline=ensure_weights(a.baseline, "--baseline"), quantized=a.quantized, export_fp16=a.export_fp16, export_int8=a.export_int8,
        num_runs=a.num_runs, warmup=a.warmup, imgsz=a.imgsz, batch=a.batch, device=a.device,
        backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()), data=resolved_data(a), workdir=a.workdir,
        isolate=not a.no_isolate, interleave=not a.no_interleave, aa_tolerance=a.aa_tolerance,
        check_images=a.check_images,
        min_agreement=a.min_agreement, calib_split=a.calib_split, calib_fraction=a.calib_fraction, measure_map=a.map,
        openvino_int8_hint=None if a.openvino_int8_hint == "default" else a.openvino_int8_hint, verbose=a.verbose)
    result = run_benchmark(opts)
    print()
    print(format_table(result))
    if a.json:
        print(f"\nJSON: {save_record(result, a.json)}")
    return 0
