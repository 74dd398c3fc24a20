"""The deployable ONNX of any model this project makes (docs/method.md, "The deployable ONNX"): Ultralytics' FP ONNX
with its weights stored as low-bit codes (formats.deploy_onnx), verified before it is written; and its TensorRT engine."""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..eval.agreement import check_inputs, compare_outputs
from ..eval.fused import fused_weight_error
from ..formats.deploy_onnx import (KINDS, DeployOnnxError, REST_CHOICES, encode_model, encoding_counts, short_names,
                                   verify_encoding)
from ..io import CheckpointError, atomic_write_bytes, load_model, save_stock_checkpoint
from .backends import reference_outputs
from .export import ExportError, PreparedModel, export_artifact, prepare_checkpoint

DETECTOR_CLASSES = ("DetectionModel",)  # what the deployable export handles (Ultralytics' detection models)
ORT_MIN_VERSION = "1.19"  # oldest onnxruntime tried that runs the deployable file (1.17.3, 1.18.1: no numpy 2)


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
    fp_onnx: str = ""  # the plain FP32 export it was made from (in the work folder)


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
            "agreement_passed": agree.passed, "criterion": agree.criterion,
            "max_abs_vs_fp_onnx": float(max(np.abs(a - b).max() for a, b in zip(fp, dep))),
            "max_abs_fp_onnx_vs_pytorch": float(max(np.abs(a - b).max() for a, b in zip(fp, refs))),
            "check_inputs": len(inputs)}


def check_onnxruntime() -> None:
    import onnxruntime as ort

    if tuple(int(x) for x in ort.__version__.split(".")[:2]) < tuple(int(x) for x in ORT_MIN_VERSION.split(".")):
        raise CheckpointError(f"onnxruntime {ort.__version__} is too old for the deployable ONNX; it needs "
                              f">= {ORT_MIN_VERSION} (pip install -U onnxruntime)")


def export_deployable(source: str | Path, out: str | Path, imgsz: int = 640, rest: str = "int8",
                      workdir: str | Path | None = None, data: str | None = None, check_images: int = 4,
                      batch: int = 1, log=print) -> DeployResult:
    """Write the deployable ONNX of `source` to `out` (atomically, only after every check passed)."""
    import onnx

    if rest not in REST_CHOICES:
        raise DeployOnnxError(f"--rest must be one of {', '.join(REST_CHOICES)}, got {rest!r}")
    check_onnxruntime()
    t0, src = time.perf_counter(), Path(source)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="yolo_tq_export_"))
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


def format_result(r: DeployResult) -> str:
    """The lines `yolo-tq export` prints."""
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


result_dict = asdict


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def build_tensorrt_engine(onnx_path: str | Path, out: str | Path, fp16: bool = True) -> tuple[bool, str]:
    """A TensorRT engine of the deployable ONNX, written as Ultralytics writes its .engine exports (4-byte length,
    metadata JSON, engine) so that `ultralytics.YOLO(out)` runs it; (built, one line: the file or TensorRT's refusal)."""
    import onnx
    import tensorrt as trt

    model_bytes = Path(onnx_path).read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no reason given"
        return False, f"TensorRT {trt.__version__} refused the ONNX: {' '.join(errors.split())}"
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return False, f"TensorRT {trt.__version__} parsed the ONNX but built no engine (see its log above)"
    meta = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props if p.key != "yolo_tq"}
    for k in ("stride", "batch"):
        if k in meta:
            meta[k] = int(meta[k])
    header = json.dumps(meta).encode()
    atomic_write_bytes(out, len(header).to_bytes(4, "little", signed=True) + header + bytes(engine))
    return True, f"TensorRT {trt.__version__} engine ({'FP16' if fp16 else 'FP32'}): {out}"


def export_deployable_artifact(prepared: PreparedModel, folder: Path, imgsz: int, batch: int, data: str | None,
                               verbose: bool) -> tuple[Path, float]:
    """The latency benchmark's 'onnx-deploy' artifact of `prepared` in `folder` (INT8 rest); (path, seconds)."""
    out = folder / f"{prepared.role}.onnx"
    try:
        r = export_deployable(prepared.checkpoint, out, imgsz, "int8", folder, data, batch=batch,
                              log=print if verbose else (lambda _: None))
    except (CheckpointError, ValueError) as e:
        raise ExportError(f"onnx-deploy export failed: {e}") from e
    return out.resolve(), r.seconds

