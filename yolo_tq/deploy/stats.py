"""Pure statistics for latency samples and quantized/baseline ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


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
    """Mean, median, p95, min, max, std (ms) and throughput (images/s) of per-run latencies given in seconds."""
    if len(samples_s) == 0:
        raise ValueError("no latency samples")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError("latency samples must be finite and non-negative")
    mean = float(ms.mean())
    return Latency(runs=int(ms.size), mean_ms=mean, median_ms=float(np.median(ms)), p95_ms=float(np.percentile(ms, 95)),
                   min_ms=float(ms.min()), max_ms=float(ms.max()), std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
                   throughput_ips=batch * 1e3 / mean if mean > 0 else math.inf)


def ratio(quantized: float | None, baseline: float | None) -> float | None:
    """quantized / baseline, or None when either is missing or the baseline is zero."""
    if quantized is None or baseline is None or baseline == 0:
        return None
    return float(quantized) / float(baseline)


RATIO_FIGURES = ("mean_ms", "median_ms", "p95_ms", "throughput_ips", "peak_rss_mb", "added_rss_mb", "gpu_mem_mb",
                 "file_mb", "file_gz_mb")


def ratios(quantized: Mapping[str, float | None], baseline: Mapping[str, float | None],
           figures: Sequence[str] = RATIO_FIGURES) -> dict[str, float]:
    """Figure -> quantized/baseline for every figure both sides have (figure name -> value mappings)."""
    return {f: ratio(quantized.get(f), baseline.get(f)) for f in figures
            if quantized.get(f) is not None and baseline.get(f) is not None}
