"""Benchmark targets (backend × device × precision), whether each can run here (a one-line reason and how to enable
it when not), and the runners that load an exported model and call it."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILIES = ("torch", "onnxruntime", "openvino", "tensorrt")
DEPLOY_REQS = 'pip install -e ".[deploy]"'


@dataclass(frozen=True)
class Target:
    name: str
    family: str  # torch | onnxruntime | openvino | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | bf16 | int8
    artifact: str  # key of the export it runs (see export.ARTIFACTS)
    flag: str | None = None  # the option that asks for it: "fp16" (--export-fp16) or "int8" (--export-int8)
    baseline_artifact: str | None = None  # what the baseline runs here, where it differs from `artifact`
    validated: bool = True  # --map validates it (Ultralytics' validator runs this export as it is timed here)

    def artifact_for(self, role: str) -> str:
        """The export key `role` (baseline | quantized) runs on this target."""
        return self.baseline_artifact if role == "baseline" and self.baseline_artifact else self.artifact


TARGETS = (
    Target("torch-cpu", "torch", "cpu", "fp32", "pt"),
    Target("onnxruntime-cpu", "onnxruntime", "cpu", "fp32", "onnx"),
    # the quantized model's deployable ONNX (1.6-bit ternary codes, INT8 rest) against the baseline's FP ONNX
    Target("onnxruntime-cpu-deploy", "onnxruntime", "cpu", "int8", "onnx-deploy", baseline_artifact="onnx"),
    Target("openvino-fp32", "openvino", "cpu", "fp32", "openvino"),
    Target("openvino-bf16", "openvino", "cpu", "bf16", "openvino", "fp16"),
    Target("openvino-int8", "openvino", "cpu", "int8", "openvino-int8", "int8"),
    Target("torch-cuda", "torch", "cuda", "fp32", "pt"),
    Target("torch-cuda-fp16", "torch", "cuda", "fp16", "pt", "fp16", validated=False),
    Target("onnxruntime-cuda", "onnxruntime", "cuda", "fp32", "onnx"),
    Target("tensorrt-fp16", "tensorrt", "cuda", "fp16", "engine-fp16", "fp16"),
    Target("tensorrt-int8", "tensorrt", "cuda", "int8", "engine-int8", "int8"),
)


def target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise KeyError(f"unknown target {name!r}; known: {', '.join(t.name for t in TARGETS)}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_int8_features(flags: set[str] | None = None) -> dict:
    """Which of the x86 instruction sets that make INT8 / BF16 inference fast this CPU has."""
    f = cpu_flags() if flags is None else flags
    names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {n: n in f for n in names}


def cuda_available() -> bool:
    if not _importable("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def availability(t: Target, device: str, export_fp16: bool, export_int8: bool, data: str | None,
                 families: tuple[str, ...] = FAMILIES) -> str | None:
    """None if `t` can run with these options on this machine, else why not and how to enable it (one line)."""
    if t.family not in families:
        return f"not in --backends (add {t.family})"
    if t.device == "cpu" and device != "cpu":
        return "a CPU target (run with --device cpu)"
    if t.device == "cuda" and device == "cpu":
        return "a CUDA target (run with --device 0 on a machine with an NVIDIA GPU)"
    if t.flag == "fp16" and not export_fp16:
        return "not requested (pass --export-fp16)"
    if t.flag == "int8" and not export_int8:
        return "not requested (pass --export-int8)"
    if t.flag == "int8" and not data:
        return "INT8 calibration needs images (pass --data YAML)"
    if t.device == "cuda" and not cuda_available():
        return "no CUDA device visible to PyTorch (needs an NVIDIA GPU and a CUDA build of torch)"
    if t.family == "onnxruntime":
        if not _importable("onnxruntime"):
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        if t.device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu in place of onnxruntime)"
    if t.family == "openvino":
        if not _importable("openvino"):
            return f"OpenVINO is not installed ({DEPLOY_REQS}, or pip install openvino)"
        if t.precision == "int8" and not _importable("nncf"):
            return f"OpenVINO INT8 export needs NNCF ({DEPLOY_REQS}, or pip install nncf)"
        if t.precision == "bf16" and not ({"avx512_bf16", "amx_bf16"} & cpu_flags()):
            return "this CPU has neither avx512_bf16 nor amx_bf16, so OpenVINO would run it as FP32"
    if t.family == "tensorrt" and not _importable("tensorrt"):
        return "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    return None


def plan_targets(device: str, export_fp16: bool, export_int8: bool, data: str | None,
                 families: tuple[str, ...] = FAMILIES) -> list[tuple[Target, str | None]]:
    """Every target with None (runs) or the reason it is skipped."""
    return [(t, availability(t, device, export_fp16, export_int8, data, families)) for t in TARGETS]


def skip_line(t: Target, reason: str) -> str:
    return f"skip {t.name}: {reason}"


# ----------------------------------------------------------------------------------------------------------- runners
class Runner:
    """Loads one exported model. `infer(x)` returns the raw prediction as float32 numpy (agreement check);
    `bind(x)` stages an input and `run()` runs it (timed); `clock()` is the clock that times `run()`."""

    notes: str = ""

    def infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bind(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def clock(self):
        from .measure import PerfCounterClock

        return PerfCounterClock()

    def inference_precision(self) -> str:
        return ""


def _first(y):
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


def _is_channels_last(model) -> bool:
    import torch

    w = next((p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


class TorchRunner(Runner):
    """The checkpoint through Ultralytics' AutoBackend (Conv+BN fused, as predict/val run it), under inference_mode."""

    def __init__(self, ckpt: Path, device: str, half: bool):
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        self.torch = torch
        self.device = torch.device("cuda:0" if device == "cuda" else "cpu")
        if self.device.type == "cuda":
            # FP32 means FP32: no TF32 convolutions / matmuls for the fp32 target
            torch.backends.cudnn.allow_tf32 = half
            torch.backends.cuda.matmul.allow_tf32 = half
            self.notes = "" if half else "TF32 disabled"
        self.model = AutoBackend(str(ckpt), device=self.device, fp16=half, fuse=True, verbose=False)
        self.model.eval()
        self.dtype = torch.float16 if half else torch.float32
        self._precision = "fp16" if half else "fp32"
        if self.device.type == "cpu" and _is_channels_last(self.model.backend.model):
            self.notes = "channels_last (AutoBackend's CPU default)"

    def _to(self, x: np.ndarray):
        return self.torch.from_numpy(x).to(self.device, self.dtype)

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            y = _first(self.model(self._to(x)))
        return y.float().cpu().numpy()

    def bind(self, x: np.ndarray) -> None:
        self.x = self._to(x)

    def run(self) -> None:
        with self.torch.inference_mode():
            self.model(self.x)

    def clock(self):
        from .measure import CudaEventClock, PerfCounterClock

        return CudaEventClock() if self.device.type == "cuda" else PerfCounterClock()

    def inference_precision(self) -> str:
        return self._precision


def ort_session_options():
    """SessionOptions whose thread pools block instead of spin-waiting between runs. By default each ONNX Runtime
    session keeps its threads spinning after a run; with two sessions in one process (the A/A and A/B passes) the
    idle one's spinning threads slow the one that runs, most whichever runs second. On a 2-core CPU shared with
    another job, two spinning sessions ran yolo11n at 320 in 60-136 ms, without spinning in 20-45 ms, as fast as
    one session alone. Thread counts stay ONNX Runtime's default (one per physical core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class OnnxRuntimeRunner(Runner):
    """An ONNX file in an onnxruntime InferenceSession (CPU, or CUDA with CPU fallback), threads not spinning."""

    notes = "thread pools without spin-waiting"

    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), ort_session_options(), providers=providers)
        used = self.session.get_providers()
        if used[0] != providers[0]:
            raise RuntimeError(f"onnxruntime did not use {providers[0]} (it used {', '.join(used)})")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        if device == "cuda":
            self.notes += "; session.run with host arrays: includes host<->device copies"

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)

    def bind(self, x: np.ndarray) -> None:
        self.feed = {self.input_name: np.ascontiguousarray(x)}

    def run(self) -> None:
        self.session.run([self.output_name], self.feed)

    def inference_precision(self) -> str:
        return "fp32"


class OpenVinoRunner(Runner):
    """An OpenVINO IR folder compiled for the CPU with the LATENCY hint and an inference-precision hint
    ('f32', 'bf16', or None for OpenVINO's default on this CPU, which is what Ultralytics' predict/val use)."""

    def __init__(self, folder: Path, precision_hint: str | None):
        import openvino as ov

        xml = folder if folder.suffix == ".xml" else next(folder.glob("*.xml"))
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.hint = precision_hint or "default"

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def bind(self, x: np.ndarray) -> None:
        self.feed = {0: np.ascontiguousarray(x)}

    def run(self) -> None:
        self.request.infer(self.feed, share_inputs=True, share_outputs=True)

    def inference_precision(self) -> str:
        t = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return t.to_string() if hasattr(t, "to_string") else str(t)


class TensorRTRunner(TorchRunner):
    """A TensorRT engine through Ultralytics' AutoBackend (reads its metadata header, replays a CUDA graph)."""

    def __init__(self, engine: Path, precision: str):
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        self.torch = torch
        self.device = torch.device("cuda:0")
        self.model = AutoBackend(str(engine), device=self.device, fp16=precision == "fp16", verbose=False)
        self.dtype = torch.float16 if self.model.backend.fp16 else torch.float32
        self._precision = precision

    def infer(self, x: np.ndarray) -> np.ndarray:
        return _first(self.model(self._to(x))).float().cpu().numpy()

    def run(self) -> None:
        self.model(self.x)


def make_runner(t: Target, artifact: Path, openvino_int8_hint: str | None = None) -> Runner:
    """The runner for target `t` on its exported artifact."""
    if t.family == "torch":
        return TorchRunner(artifact, t.device, half=t.precision == "fp16")
    if t.family == "onnxruntime":
        return OnnxRuntimeRunner(artifact, t.device)
    if t.family == "openvino":
        hint = {"fp32": "f32", "bf16": "bf16", "int8": openvino_int8_hint}[t.precision]
        return OpenVinoRunner(artifact, hint)
    if t.family == "tensorrt":
        return TensorRTRunner(artifact, t.precision)
    raise ValueError(f"no runner for {t.family}")


def versions() -> dict:
    """Versions of the packages the targets use (None where not installed)."""
    out = {}
    for mod in ("torch", "ultralytics", "onnx", "onnxslim", "onnxruntime", "openvino", "nncf", "tensorrt"):
        if not _importable(mod):
            out[mod] = None
            continue
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
            out[mod] = f"import failed: {type(e).__name__}"
    return out
