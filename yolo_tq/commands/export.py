"""Export any model this project makes (ternary.pt, a training checkpoint, a C2PSA output, a packed
.tq.safetensors, or a plain YOLO11 .pt) to a deployable ONNX: ternary weights as 1.6-bit codes, the other conv
weights INT8 per output channel (or FP16 / FP32 with --rest), decoded inside the graph by ordinary ONNX operators
that onnxruntime and OpenVINO fold away at load, so the small file runs at the FP export's speed. Ultralytics'
metadata is embedded: `ultralytics.YOLO("model.onnx")` predicts and validates it with nothing of this project
installed.

  python export.py checkpoints/yolo11n/stage3/ternary.pt --out stage3.onnx [--imgsz 640] [--rest int8]
  yolo-tq export CKPT --out FILE

Before writing, the export decodes every stored tensor in onnxruntime and compares it with the FP export's
(ternary: bit-exact; INT8: within half a step), compares the ternary weights with PyTorch's fused weights, and
checks the file's detections against PyTorch's on --check-images images (of --data's val split, or Ultralytics'
sample images). The encoding is described in yolo_tq/formats/deploy_onnx.py and docs/method.md.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from ..formats.deploy_onnx import KINDS, REST_CHOICES
from ..formats.engine import build_tensorrt_engine, tensorrt_available
from ..io import check_writable, same_file
from .args import data_path, imgsz_arg, input_file, output_path, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=input_file, metavar="CKPT", help="model to export (.pt or .tq.safetensors)")
    p.add_argument("--out", type=output_path, help="ONNX file to write (default: CKPT's name with .onnx, beside it)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="input size of the exported graph (default 640)")
    p.add_argument("--rest", choices=REST_CHOICES, default="int8",
                   help="precision of the non-ternary conv weights (default int8, per output channel)")
    p.add_argument("--data", type=data_path,
                   help="data yaml whose val images the output check uses (default: Ultralytics' samples)")
    p.add_argument("--check-images", type=positive_int, default=4, help="images for the output check (default 4)")
    p.add_argument("--workdir", type=output_path,
                   help="keep the intermediate files (the FP export) here (default: a temporary folder, removed after)")
    p.add_argument("--json", type=output_path, help="also write what was written and measured to this JSON file")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build a TensorRT FP16 engine from the ONNX (beside it, .engine; needs TensorRT)")


def default_out(ckpt: str) -> str:
    p = Path(ckpt)
    name = p.name[: -len(".tq.safetensors")] if p.name.endswith(".tq.safetensors") else p.stem
    return str(p.with_name(name + ".onnx"))


def format_result(r) -> str:
    """The lines `yolo-tq export` prints of a deploy.deployable.DeployResult."""
    c, o = r.encoding, r.outputs
    kinds = ", ".join(f"{c[k]['tensors']} {k}" for k in KINDS if c[k]["tensors"])
    errs = ", ".join(f"{k.replace('max_rel_error_', '')} {v:.3g}" for k, v in r.decode_errors.items())
    lines = [
        f"ternary layers: {c['ternary']['tensors']} (fused PyTorch model: {r.ternary_convs_model})",
        f"encoded tensors: {kinds or 'none'}; rest {r.rest}",
        f"decoded in onnxruntime vs the FP export, max relative error: {errs or '-'}",
        f"ternary weights vs PyTorch's fused weights: max relative error {r.pytorch_weight_rel_error:.3g} "
        f"({r.pytorch_weights_compared} tensors)",
        f"outputs on {o['check_inputs']} images: max|Δ| vs PyTorch {o['max_abs_vs_pytorch']:.4g} (FP ONNX "
        f"{o['max_abs_fp_onnx_vs_pytorch']:.4g}), vs the FP ONNX {o['max_abs_vs_fp_onnx']:.4g}; detection "
        f"agreement {o['det_agreement_vs_pytorch']:.3f} ({'passed' if o['agreement_passed'] else 'FAILED'})",
        f"file: {r.out}  {r.bytes:,} bytes ({r.bytes / 1e6:.2f} MB; the FP ONNX: {r.fp_onnx_bytes / 1e6:.2f} MB, "
        f"{r.fp_onnx_bytes / r.bytes:.1f}x smaller), imgsz {r.imgsz}, {r.seconds:.0f} s",
    ]
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ..config import ConfigError
    from ..deploy.deployable import export_deployable
    from ..io import write_json

    out = a.out or default_out(a.checkpoint)
    for path, what in ((out, "the ONNX file"), (a.json, "the JSON report")):
        if path:
            check_writable(path, what, inputs=[a.checkpoint, a.data])
    if a.workdir:
        check_writable(a.workdir, "the work folder", folder=True, inputs=[a.checkpoint, a.data])
    if a.json and same_file(a.json, out):
        raise ConfigError("--json and --out name the same file")
    if not Path(a.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {a.checkpoint}")
    engine = str(Path(out).with_suffix(".engine"))
    if a.tensorrt:
        if not tensorrt_available():
            raise ConfigError('--tensorrt needs TensorRT (pip install -e ".[gpu]" on a machine with an NVIDIA GPU)')
        check_writable(engine, "the TensorRT engine")
    r = export_deployable(a.checkpoint, out, a.imgsz, a.rest, a.workdir, a.data, a.check_images)
    print(format_result(r))
    if a.json:
        print(f"JSON: {write_json(asdict(r), a.json)}")
    if a.tensorrt:
        built, line = build_tensorrt_engine(out, engine)
        print(line)
        return 0 if built else 1
    return 0
