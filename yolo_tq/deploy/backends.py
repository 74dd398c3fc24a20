"""Benchmark targets (backend × device × precision), each saying what it exports, what it needs to run here and
which runner loads its export and calls it."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..machine import cpu_features, importable
from .measure import CudaEventClock, PerfCounterClock

FAMILIES = ("torch", "onnxruntime", "openvino", "tensorrt")
DEPLOY_REQS = 'pip install -e ".[deploy]"'


def cuda_available() -> bool:
    return importable("torch") and importlib.import_module("torch").cuda.is_available()


# what a target may need -> why it is missing and how to get it (the skip line); a module is there when importable
NEEDS = {
    "cuda": "no CUDA device visible to PyTorch (needs an NVIDIA GPU and a CUDA build of torch)",
    "onnxruntime": "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)",
    "ort-cuda": "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu in place of onnxruntime)",
    "openvino": f"OpenVINO is not installed ({DEPLOY_REQS}, or pip install openvino)",
    "nncf": f"OpenVINO INT8 export needs NNCF ({DEPLOY_REQS}, or pip install nncf)",
    "bf16": "this CPU has neither avx512_bf16 nor amx_bf16, so OpenVINO would run it as FP32",
    "tensorrt": "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)",
}


def _met(need: str) -> bool:
    if need == "cuda":
        return cuda_available()
    if need == "ort-cuda":
        return "CUDAExecutionProvider" in importlib.import_module("onnxruntime").get_available_providers()
    if need == "bf16":
        return any(cpu_features()[f] for f in ("avx512_bf16", "amx_bf16"))
    return importable(need)


@dataclass(frozen=True)
class Target:
    """Runs `artifact` (a deployable.ARTIFACTS key; the baseline's `baseline_artifact` where that differs) with the
    runner of its `family` (RUNNERS), asked for by `flag` (fp16: --export-fp16, int8: --export-int8), where its
    `needs` are met; `validated`: --map validates it (Ultralytics' validator runs that export as it is timed)."""

    name: str
    family: str  # torch | onnxruntime | openvino | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | bf16 | int8
    artifact: str
    flag: str | None = None
    needs: tuple[str, ...] = ()  # NEEDS keys, checked in order
    baseline_artifact: str | None = None
    validated: bool = True

    def artifact_for(self, role: str) -> str:  # role: baseline | quantized
        return self.baseline_artifact if role == "baseline" and self.baseline_artifact else self.artifact

    def skip_reason(self, o) -> str | None:
        """None if this target runs here with the options `o` (bench.BenchOptions, device "cpu" or "cuda"), else
        why not and how to enable it (one line)."""
        if self.family not in o.backends:
            return f"not in --backends (add {self.family})"
        if (self.device == "cpu") != (o.device == "cpu"):
            return "a CPU target (run with --device cpu)" if self.device == "cpu" else \
                "a CUDA target (run with --device 0 on a machine with an NVIDIA GPU)"
        if self.flag and not {"fp16": o.export_fp16, "int8": o.export_int8}[self.flag]:
            return f"not requested (pass --export-{self.flag})"
        if self.flag == "int8" and not o.data:
            return "INT8 calibration needs images (pass --data YAML)"
        missing = next((NEEDS[n] for n in self.needs if not _met(n)), None)
        if missing is None and self.baseline_artifact and not o.quantized:
            return "runs the quantized model's deployable ONNX against the baseline's (give --quantized)"
        return missing

    def runner(self, artifact: str | Path, openvino_int8_hint: str | None = None) -> Runner:
        return RUNNERS[self.family](Path(artifact), self, openvino_int8_hint)


TARGETS = (
    Target("torch-cpu", "torch", "cpu", "fp32", "pt"),
    Target("onnxruntime-cpu", "onnxruntime", "cpu", "fp32", "onnx", needs=("onnxruntime",)),
    # the quantized model's deployable ONNX (1.6-bit ternary codes, INT8 rest) against the baseline's FP ONNX
    Target("onnxruntime-cpu-deploy", "onnxruntime", "cpu", "int8", "onnx-deploy", needs=("onnxruntime",),
           baseline_artifact="onnx"),
    Target("openvino-fp32", "openvino", "cpu", "fp32", "openvino", needs=("openvino",)),
    Target("openvino-bf16", "openvino", "cpu", "bf16", "openvino", "fp16", ("openvino", "bf16")),
    Target("openvino-int8", "openvino", "cpu", "int8", "openvino-int8", "int8", ("openvino", "nncf")),
    Target("torch-cuda", "torch", "cuda", "fp32", "pt", needs=("cuda",)),
    Target("torch-cuda-fp16", "torch", "cuda", "fp16", "pt", "fp16", ("cuda",), validated=False),
    Target("onnxruntime-cuda", "onnxruntime", "cuda", "fp32", "onnx", needs=("cuda", "onnxruntime", "ort-cuda")),
    Target("tensorrt-fp16", "tensorrt", "cuda", "fp16", "engine-fp16", "fp16", ("cuda", "tensorrt")),
    Target("tensorrt-int8", "tensorrt", "cuda", "int8", "engine-int8", "int8", ("cuda", "tensorrt")),
)


def target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise KeyError(f"unknown target {name!r}; known: {', '.join(t.name for t in TARGETS)}")


def reference_outputs(checkpoint: str | Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The PyTorch model's raw outputs (CPU, FP32, Conv+BN fused) on the check inputs."""
    runner = target("torch-cpu").runner(checkpoint)
    return [runner.infer(x) for x in inputs]


class Runner:
    """Loads one export (path, target, OpenVINO INT8 hint). infer(x): the raw prediction as float32 numpy (agreement
    check); bind(x): the call that runs x, staged, for a `clock()` to time; `precision`: what it runs at."""

    notes, precision, clock = "", "", PerfCounterClock


class AutoBackendRunner(Runner):
    """Through Ultralytics' AutoBackend: a checkpoint (Conv+BN fused, as predict/val run it, under inference_mode)
    or a TensorRT engine (reads its metadata header, replays a CUDA graph)."""

    def __init__(self, path: Path, t: Target, _hint=None):
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        half, engine = t.precision == "fp16", t.family == "tensorrt"
        self.torch, self.mode = torch, contextlib.nullcontext if engine else torch.inference_mode
        self.device, self.precision = torch.device("cuda:0" if t.device == "cuda" else "cpu"), t.precision
        if t.device == "cuda":
            self.clock = CudaEventClock
        if t.device == "cuda" and not engine:  # FP32 means FP32: no TF32 convolutions / matmuls for the fp32 target
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = half
            self.notes = "" if half else "TF32 disabled"
        self.model = AutoBackend(str(path), device=self.device, fp16=half, fuse=True, verbose=False)
        self.model.eval()
        self.dtype = torch.float16 if self.model.backend.fp16 else torch.float32
        if t.device == "cpu":  # channels_last shows in a conv weight with more than one channel and pixel
            w = next((p for p in self.model.backend.model.parameters() if p.dim() == 4 and p.shape[1] > 1
                      and p.shape[2] > 1), None)
            if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                self.notes = "channels_last (AutoBackend's CPU default)"

    def bind(self, x: np.ndarray):
        staged = self.torch.from_numpy(x).to(self.device, self.dtype)

        def run():
            with self.mode():
                return self.model(staged)
        return run

    def infer(self, x: np.ndarray) -> np.ndarray:
        y = self.bind(x)()
        while isinstance(y, (list, tuple)):
            y = y[0]
        return y.float().cpu().numpy()


class OnnxRuntimeRunner(Runner):
    """An ONNX file in an onnxruntime InferenceSession (CPU, or CUDA with CPU fallback) whose thread pools block
    instead of spin-waiting between runs (docs/method.md, "Timing"); thread counts are onnxruntime's default."""

    notes, precision = "thread pools without spin-waiting", "fp32"

    def __init__(self, path: Path, t: Target, _hint=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider"] * (t.device == "cuda") + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        used = self.session.get_providers()
        if used[0] != providers[0]:
            raise RuntimeError(f"onnxruntime did not use {providers[0]} (it used {', '.join(used)})")
        self.input_name, self.output_name = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        if t.device == "cuda":
            self.notes += "; session.run with host arrays: includes host<->device copies"

    def bind(self, x: np.ndarray):
        feed = {self.input_name: np.ascontiguousarray(x)}
        return lambda: self.session.run([self.output_name], feed)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.bind(x)()[0], dtype=np.float32)


class OpenVinoRunner(Runner):
    """An OpenVINO IR folder compiled for the CPU with the LATENCY hint and an inference-precision hint: f32, bf16,
    or for INT8 the one given (by default none: OpenVINO's choice here, as Ultralytics' predict/val run it)."""

    def __init__(self, folder: Path, t: Target, int8_hint: str | None = None):
        import openvino as ov

        hint = {"fp32": "f32", "bf16": "bf16"}.get(t.precision, int8_hint)
        xml = folder if folder.suffix == ".xml" else next(folder.glob("*.xml"))
        config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_PRECISION_HINT": hint} if hint else {})}
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self.request = self.compiled.create_infer_request()
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = used.to_string() if hasattr(used, "to_string") else str(used)

    def bind(self, x: np.ndarray):
        feed = {0: np.ascontiguousarray(x)}
        return lambda: self.request.infer(feed, share_inputs=True, share_outputs=True)

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.bind(x)()
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


RUNNERS = {"torch": AutoBackendRunner, "onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner,
           "tensorrt": AutoBackendRunner}


def openvino_default_precision(artifact: str | Path) -> str | None:
    """The inference precision OpenVINO picks on this CPU when not told (bf16 on CPUs with AMX / AVX512-BF16)."""
    try:
        return OpenVinoRunner(Path(artifact), target("openvino-int8")).precision  # int8: no hint
    except Exception:  # noqa: BLE001
        return None
