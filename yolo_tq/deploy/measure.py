"""Measuring: the timing loop and its clocks, the statistics of latency samples and of quantized/baseline ratios (the
A/A band, paired bootstrap intervals), memory and file sizes (docs/method.md, "Timing")."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

AA_TOLERANCE = 0.03  # an A/A check (baseline against itself) must read 1.00 ± this for a target's A/B to count
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
MIB = 1024 * 1024  # memory figures (*_mb) are in MiB, as RSS is usually read; file sizes are in bytes
RATIO_FIGURES = ("mean_ms", "median_ms", "p95_ms", "throughput_ips", "peak_rss_mb", "added_rss_mb", "gpu_mem_mb",
                 "file_bytes", "file_gz_bytes")


class PerfCounterClock:
    """The wall clock (time.perf_counter), for calls that return when their work is done."""

    name = "perf_counter"

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class CudaEventClock:
    """CUDA events on torch's current stream: the GPU's own time between them, read after the end event."""

    name = "cuda_events"

    def __init__(self):
        import torch

        self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

    def start(self) -> None:
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3


def time_interleaved(runs: Sequence[Callable[[], Any]], clocks: Sequence, num_runs: int, warmup: int = 0) \
        -> list[list[float]]:
    """Call each of `runs` `warmup` times untimed, then `num_runs` iterations that call each once, timed by its clock,
    in an order that rotates by one per iteration: over len(runs) iterations each runs once in every position."""
    if num_runs < 1 or warmup < 0:
        raise ValueError(f"need num_runs >= 1 and warmup >= 0, got {num_runs} and {warmup}")
    for run in runs:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for _ in range(num_runs):
        for i in order:
            clocks[i].start()
            runs[i]()
            samples[i].append(clocks[i].stop())
        order = order[1:] + order[:1]
    return samples


@dataclass(frozen=True)
class Latency:
    """Latency of `runs` timed runs (ms) and the throughput it implies (images/s)."""

    runs: int
    mean_ms: float
    median_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    throughput_ips: float


def latency_stats(samples_s: Sequence[float], batch: int = 1) -> Latency:
    """Latency of per-run latencies given in seconds."""
    if len(samples_s) == 0 or batch < 1:
        raise ValueError(f"need latency samples and batch >= 1, got {len(samples_s)} samples and batch {batch}")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError("latency samples must be finite and non-negative")
    mean = float(ms.mean())
    return Latency(runs=int(ms.size), mean_ms=mean, median_ms=float(np.median(ms)), p95_ms=float(np.percentile(ms, 95)),
                   min_ms=float(ms.min()), max_ms=float(ms.max()), std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
                   throughput_ips=batch * 1e3 / mean if mean > 0 else math.inf)


def ratios(quantized: Mapping[str, float | None], baseline: Mapping[str, float | None],
           figures: Sequence[str] = RATIO_FIGURES) -> dict[str, float | None]:
    """Figure -> quantized/baseline for every figure both sides have (None where the baseline is zero)."""
    return {f: float(quantized[f]) / float(baseline[f]) if baseline[f] else None for f in figures
            if quantized.get(f) is not None and baseline.get(f) is not None}


def cycle_ratios(test_s: Sequence[float], ref_s: Sequence[float], cycle: int) -> np.ndarray:
    """Per rotation cycle of an interleaved pass (`cycle` iterations: every model once in every position), the test
    model's summed time / the reference's, which cancels the cost of running right after the other model; per
    iteration where there is no full cycle."""
    t, r = np.asarray(test_s, np.float64), np.asarray(ref_s, np.float64)
    if t.shape != r.shape or t.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    n = t.size // cycle * cycle if cycle > 0 else 0
    if n == 0:
        return t / r
    return t[:n].reshape(-1, cycle).sum(axis=1) / r[:n].reshape(-1, cycle).sum(axis=1)


def median_interval(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, lower, upper): the median and its percentile-bootstrap interval at `level` (fixed seed)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no values")
    meds = np.median(v[np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))], axis=1)
    lo, hi = np.percentile(meds, [50 * (1 - level), 50 * (1 + level)])
    return float(np.median(v)), float(lo), float(hi)


def within_band(value: float | None, tolerance: float = AA_TOLERANCE) -> bool:
    """True when an A/A ratio reads 1.00 ± tolerance (rounded to the 3 decimals it is reported with)."""
    return value is not None and abs(round(value, 3) - 1.0) <= tolerance + 1e-12


def _status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss(tolerance_kb: int = 4096) -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (Linux: clear_refs 5); True only when the mark
    then reads within `tolerance_kb` of it (some kernels take the write and ignore it). On False, peak_rss_mb() is
    the peak since process start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_follows_rss(_status_kb("VmHWM"), _status_kb("VmRSS"), tolerance_kb)


def _peak_follows_rss(peak_kb: int | None, rss_kb: int | None, tolerance_kb: int) -> bool:
    return peak_kb is not None and rss_kb is not None and peak_kb <= rss_kb + tolerance_kb


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; getrusage's ru_maxrss where /proc is absent)."""
    kb = _status_kb("VmHWM")
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kb is None else kb) / 1024  # KiB on Linux


def _cuda_used_mb() -> float:
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / MIB


@dataclass(frozen=True)
class Memory:
    """Peak RSS of the measuring process (since its reset, else its start); on CUDA the device memory added. MiB."""

    peak_rss_mb: float
    rss_base_mb: float | None = None
    added_rss_mb: float | None = None
    peak_rss_reset: bool = False
    gpu_mem_mb: float | None = None
    torch_peak_alloc_mb: float | None = None


class MemoryMeter:
    """Made before a target loads (resets the peak marks, reads what is in use); read(): the Memory since then."""

    def __init__(self, cuda: bool):
        self.cuda_base = None
        if cuda:
            import torch

            torch.cuda.init()
            self.cuda_base = _cuda_used_mb()
            torch.cuda.reset_peak_memory_stats()
        self.reset, rss_kb = reset_peak_rss(), _status_kb("VmRSS")
        self.rss_base = None if rss_kb is None else rss_kb / 1024

    def read(self) -> Memory:
        peak, base, gpu = peak_rss_mb(), self.rss_base, {}
        if self.cuda_base is not None:
            import torch

            gpu = {"gpu_mem_mb": _cuda_used_mb() - self.cuda_base,
                   "torch_peak_alloc_mb": torch.cuda.max_memory_allocated() / MIB}
        return Memory(peak_rss_mb=peak, rss_base_mb=base, added_rss_mb=None if base is None else peak - base,
                      peak_rss_reset=self.reset, **gpu)


def file_bytes(path: str | Path, compressed: bool = False) -> int:
    """Size on disk of a model file or folder (OpenVINO's .xml + .bin + metadata); `compressed`: after zlib, what
    low-entropy (ternary) weights save in storage or download, which dense formats and their runtime memory do not."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return sum(_zlib_bytes(f) if compressed else os.path.getsize(f) for f in files)


def _zlib_bytes(path: Path, level: int = 6) -> int:
    c, total = zlib.compressobj(level), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            total += len(c.compress(chunk))
    return total + len(c.flush())
