"""Facts about this machine that results record beside their figures: CPU instruction sets, package versions (the
deploy runtimes, and the packages whose numerics reach training) and whether a module can be imported."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from importlib import metadata
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
RUNTIME_MODULES = ("torch", "ultralytics", "onnx", "onnxslim", "onnxruntime", "openvino", "nncf", "tensorrt")
# training is bit-exact only under the same versions of these (augmentation, resizing, BLAS)
NUMERICS_PACKAGES = ("torchvision", "numpy", "opencv-python", "opencv-python-headless", "pillow", "scipy")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cpu_features() -> dict[str, bool]:
    """Which of the x86 instruction sets that make INT8 / BF16 inference fast this CPU has (per /proc/cpuinfo)."""
    flags = set()
    with contextlib.suppress(OSError):
        line = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "flags:")
        flags = set(line.split(":", 1)[1].split())
    return {n: n in flags for n in CPU_FLAGS}


def cpu_identity() -> dict[str, str]:
    """The CPU's name, family, model, stepping and microcode (per /proc/cpuinfo's first processor): two machines with
    the same name and flags can still differ here, and training is bit-exact only on the same CPU."""
    keys, out = ("model name", "cpu family", "model", "stepping", "microcode"), {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in keys:
                out[key] = value
    return out


def module_versions(modules=RUNTIME_MODULES) -> dict[str, str | None]:
    """Each module's __version__ (None where not installed; an import failure is reported, not raised)."""
    out = {}
    for mod in modules:
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?")) if importable(mod) else None
        except Exception as e:  # noqa: BLE001
            out[mod] = f"import failed: {type(e).__name__}"
    return out


def package_versions(names=NUMERICS_PACKAGES) -> dict[str, str]:
    """Installed distributions' versions (the ones not installed are left out)."""
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
