"""Exports: the checkpoint the exporters take, Ultralytics' exports (ONNX simplified with onnxslim, OpenVINO FP32 /
INT8 via NNCF, TensorRT FP16 / INT8), and the deployable ONNX of any model this project makes (docs/method.md, "The
deployable ONNX"): Ultralytics' FP ONNX with its weights stored as low-bit codes (formats.deploy_onnx), verified
before it is written (its TensorRT engine: formats.engine)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..eval.agreement import check_inputs, compare_outputs
from ..eval.fused import deploy_weight_summary, fused_weight_error, single_thread
from ..eval.layers import conv_rows, totals
from ..eval.validate import captured_output
from ..formats.deploy_onnx import (DeployOnnxError, REST_CHOICES, encode_model, encoding_counts, short_names,
                                   verify_encoding)
from ..io import CheckpointError, atomic_write_bytes, load_model, save_stock_checkpoint
from ..quant.apply import export_ternary, quantized_modules
from ..quant.layers import BitConv2d
from .backends import reference_outputs

DETECTOR_CLASSES = ("DetectionModel",)  # what the deployable export handles (Ultralytics' detection models)
ORT_MIN_VERSION = "1.19"  # oldest onnxruntime tried that runs the deployable file (1.17.3, 1.18.1: no numpy 2)
# artifact key -> Ultralytics export arguments (None: the checkpoint itself; onnx-deploy: export_deployable)
ARTIFACTS: dict[str, dict | None] = {
    "pt": None,
    "onnx": {"format": "onnx", "simplify": True},
    "onnx-deploy": {"format": "onnx-deploy"},  # the FP ONNX with its weights stored as codes
    "openvino": {"format": "openvino"},
    "openvino-int8": {"format": "openvino", "quantize": 8},
    "engine-fp16": {"format": "engine", "quantize": 16},
    "engine-int8": {"format": "engine", "quantize": 8},
}


class ExportError(RuntimeError):
    """An export that failed; the message is one line, the exporter's log is in the work folder."""


@dataclass
class PreparedModel:
    role: str  # baseline | quantized
    source: Path  # what the user passed
    checkpoint: Path  # an Ultralytics-loadable checkpoint in the work folder (symlink or re-saved export)
    kind: str  # fp | ternary | ttq-training
    summary: dict = field(default_factory=dict)


def _link(src: Path, dst: Path) -> Path:
    """dst -> src as a symlink (a copy where links are not possible): exports go next to dst, never next to the
    user's file (which may be read-only)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
    return dst


def prepare_checkpoint(path: str | Path, workdir: Path, role: str) -> PreparedModel:
    """The stock checkpoint the exporter takes: a training checkpoint's TTQ layers become plain convs holding their
    three values (export_ternary). summary["activation_rounding"]: BitLinear layers (8-bit activations) remain."""
    src = Path(path)
    model, ckpt = load_model(src)
    workdir.mkdir(parents=True, exist_ok=True)
    dst, q = workdir / f"{role}.pt", quantized_modules(model)
    if q:
        model, kind = export_ternary(model), "ttq-training"
        save_stock_checkpoint(model, dst, train_args=ckpt.get("train_args"))
    else:
        kind = "fp"
        _link(src, dst)
    with single_thread():
        tot, deploy = totals(model, conv_rows(model)), deploy_weight_summary(model)
    kept = quantized_modules(model).values()
    summary = {"quantized_modules_in_checkpoint": len(q),
               "quantized_modules_kept": sorted({type(m).__name__ for m in kept}),
               "activation_rounding": any(isinstance(m, BitConv2d) for m in kept), **tot, "deploy": deploy}
    return PreparedModel(role, src, dst, "ternary" if kind == "fp" and tot["ternary_convs"] else kind, summary)


def export_artifact(prepared: PreparedModel, key: str, workdir: Path, imgsz: int, batch: int, data: str | None = None,
                    calib_split: str = "train", fraction: float = 1.0, verbose: bool = False) -> tuple[Path, float]:
    """Export `prepared` to the artifact `key` in its own folder under workdir; returns (path, seconds)."""
    if key not in ARTIFACTS:
        raise ValueError(f"unknown artifact {key!r}; known: {', '.join(ARTIFACTS)}")
    args = ARTIFACTS[key]
    if args is None:
        return prepared.checkpoint, 0.0
    if args["format"] == "onnx-deploy":  # INT8 rest
        out = workdir / key / f"{prepared.role}.onnx"
        try:
            r = export_deployable(prepared.checkpoint, out, imgsz, "int8", out.parent, data, batch=batch,
                                  log=print if verbose else (lambda _: None))
        except (CheckpointError, ValueError) as e:
            raise ExportError(f"onnx-deploy export failed: {e}") from e
        return out.resolve(), r.seconds
    from ultralytics import YOLO

    ckpt = _link(prepared.checkpoint.resolve(), workdir / key / f"{prepared.role}.pt")
    kwargs = dict(args, imgsz=imgsz, batch=batch, device=0 if args["format"] == "engine" else "cpu")
    if args.get("quantize") == 8:
        if not data:
            raise ExportError(f"{key} needs calibration images (--data)")
        kwargs.update(data=data, split=calib_split, fraction=fraction)
    log, t0 = workdir / "export.log", time.perf_counter()
    try:
        with captured_output(None if verbose else log):
            out = YOLO(str(ckpt), task="detect").export(**kwargs)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one line for this target
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"{key} export failed: {type(e).__name__}: {msg} (log: {log})") from e
    path = Path(out[0] if isinstance(out, (list, tuple)) else out)
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not path.exists():
        raise ExportError(f"{key} export reported {path}, which does not exist (log: {log})")
    return path.resolve(), time.perf_counter() - t0


@dataclass
class DeployResult:
    """What `export_deployable` wrote and measured."""

    source: str
    out: str
    imgsz: int
    rest: str
    bytes: int
    fp_onnx_bytes: int
    ternary_convs_model: int  # per-channel ternary convs of the fused PyTorch model
    encoding: dict  # per kind: tensors, bytes before / after (formats.deploy_onnx.encoding_counts)
    decode_errors: dict  # largest relative error per kind, decoded in onnxruntime vs the FP export's tensors
    pytorch_weight_rel_error: float  # ternary tensors of the FP export vs PyTorch's fused weights
    pytorch_weights_compared: int
    outputs: dict = field(default_factory=dict)  # agreement with PyTorch and the FP ONNX
    seconds: float = 0.0
    fp_onnx: str = ""  # the plain FP32 export it was made from, in --workdir ("" without one: it was temporary)


def _stock_input(path: Path, work: Path):
    """(PreparedModel, model) of any input: a .pt (stock, training checkpoint, C2PSA output) or a packed file."""
    if path.name.endswith(".safetensors"):
        from ..formats.reader import load_packed  # registers the packed loader's builder: only when needed

        model = load_packed(path)
        prepared = prepare_checkpoint(save_stock_checkpoint(model, work / "unpacked.pt"), work, "model")
    else:
        prepared = prepare_checkpoint(path, work, "model")
        model, _ = load_model(prepared.checkpoint)
    if type(model).__name__ not in DETECTOR_CLASSES:
        raise CheckpointError(f"{path} holds a {type(model).__name__}, not a YOLO detection model; the deployable "
                              f"export handles {', '.join(DETECTOR_CLASSES)}")
    return prepared, model


def output_check(fp_onnx: Path, deploy_bytes: bytes, checkpoint: Path, inputs, rounding: bool, rest: str) -> dict:
    """Outputs of the deployable file against PyTorch's (the latency benchmark's agreement check) and the FP ONNX's."""
    import onnxruntime as ort

    refs = reference_outputs(checkpoint, inputs)
    sessions = [ort.InferenceSession(src, providers=["CPUExecutionProvider"]) for src in (str(fp_onnx), deploy_bytes)]
    name = sessions[0].get_inputs()[0].name
    fp, dep = ([np.asarray(s.run(None, {name: x})[0], np.float32) for x in inputs] for s in sessions)
    agree = compare_outputs(refs, dep, rest, activation_rounding=rounding)
    return {"max_abs_vs_pytorch": agree.max_abs, "det_agreement_vs_pytorch": agree.det_agreement,
            "agreement_passed": agree.passed, "criterion": agree.criterion, "fine_passed": agree.fine_passed,
            "agreement_explanation": agree.explanation,
            "max_abs_vs_fp_onnx": float(max(np.abs(a - b).max() for a, b in zip(fp, dep))),
            "max_abs_fp_onnx_vs_pytorch": float(max(np.abs(a - b).max() for a, b in zip(fp, refs))),
            "check_inputs": len(inputs)}


def export_deployable(source: str | Path, out: str | Path, imgsz: int = 640, rest: str = "int8",
                      workdir: str | Path | None = None, data: str | None = None, check_images: int = 4,
                      batch: int = 1, log=print) -> DeployResult:
    """Write the deployable ONNX of `source` to `out` (atomically, only after every check passed)."""
    import onnxruntime as ort

    if rest not in REST_CHOICES:
        raise DeployOnnxError(f"--rest must be one of {', '.join(REST_CHOICES)}, got {rest!r}")
    if tuple(int(x) for x in ort.__version__.split(".")[:2]) < tuple(int(x) for x in ORT_MIN_VERSION.split(".")):
        raise CheckpointError(f"onnxruntime {ort.__version__} is too old for the deployable ONNX; it needs "
                              f">= {ORT_MIN_VERSION} (pip install -U onnxruntime)")
    if workdir:
        return _export_in(Path(workdir), Path(source), out, imgsz, rest, data, check_images, batch, log)
    with tempfile.TemporaryDirectory(prefix="yolo_tq_export_") as tmp:  # removed on success and on error alike
        return replace(_export_in(Path(tmp), Path(source), out, imgsz, rest, data, check_images, batch, log),
                       fp_onnx="")


def _export_in(work: Path, src: Path, out, imgsz, rest, data, check_images, batch, log) -> DeployResult:
    """export_deployable's work, its intermediate files (the FP ONNX among them) kept in `work`."""
    import onnx

    t0 = time.perf_counter()
    prepared, model = _stock_input(src, work)
    n_ternary = prepared.summary["deploy"]["ternary_convs"]
    log(f"{src}: {n_ternary} of the fused model's convs are ternary per channel")
    try:
        fp_path, _ = export_artifact(prepared, "onnx", work, imgsz, batch)
    except ExportError as e:
        raise CheckpointError(str(e)) from e
    fp_model = onnx.load(str(fp_path))
    info = {"source": src.name, "imgsz": imgsz, "ternary_convs_model": n_ternary}
    dfl = {f"{path}.conv.weight" for path, m in model.named_modules() if type(m).__name__ == "DFL"}  # a 0..15 ramp
    encoded, done = encode_model(fp_model, rest, keep_float=dfl, info=info)
    onnx.checker.check_model(encoded)
    errors, counts = verify_encoding(fp_model, encoded, done), encoding_counts(done)
    if counts["ternary"]["tensors"] != n_ternary:
        log(f"note: the ONNX graph has {counts['ternary']['tensors']} ternary conv weights, the fused model "
            f"{n_ternary} ternary convs")
    pt_err, pt_n = fused_weight_error(fp_model, [e.name for e in done if e.kind == "ternary"], model)
    short_names(encoded)  # after the checks that look tensors up by name; the output check below runs these bytes
    onnx.checker.check_model(encoded)
    data_bytes = encoded.SerializeToString()
    outputs = output_check(fp_path, data_bytes, prepared.checkpoint, check_inputs(data, imgsz, batch, check_images),
                           prepared.summary.get("activation_rounding", False), rest)
    if not outputs["agreement_passed"]:
        raise DeployOnnxError(f"the encoded model's detections disagree with PyTorch's ({outputs['criterion']}: "
                              f"agreement {outputs['det_agreement_vs_pytorch']:.3f}); nothing written")
    atomic_write_bytes(out, data_bytes)
    return DeployResult(str(src), str(out), imgsz, rest, len(data_bytes), fp_path.stat().st_size, n_ternary, counts,
                        errors, pt_err, pt_n, outputs, time.perf_counter() - t0, str(fp_path))
