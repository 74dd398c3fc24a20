"""Pure statistics for latency samples and quantized/baseline ratios."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def latency_stats(samples_s: Sequence[float], batch: int = 1) -> dict:
    """Mean, median, p95, min, max, std (ms) and throughput (images/s) of per-run latencies given in seconds."""
    if len(samples_s) == 0:
        raise ValueError("no latency samples")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError("latency samples must be finite and non-negative")
    mean = float(ms.mean())
    return {"runs": int(ms.size), "mean_ms": mean, "median_ms": float(np.median(ms)),
            "p95_ms": float(np.percentile(ms, 95)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            "throughput_ips": batch * 1e3 / mean if mean > 0 else math.inf}


def ratio(quantized: float | None, baseline: float | None) -> float | None:
    """quantized / baseline, or None when either is missing or the baseline is zero."""
    if quantized is None or baseline is None or baseline == 0:
        return None
    return float(quantized) / float(baseline)


RATIO_FIGURES = ("mean_ms", "median_ms", "p95_ms", "throughput_ips", "peak_rss_mb", "added_rss_mb", "gpu_mem_mb",
                 "file_mb", "file_gz_mb")


def ratios(quantized_row: dict, baseline_row: dict, figures: Sequence[str] = RATIO_FIGURES) -> dict:
    """Figure -> quantized/baseline for every figure both rows have."""
    return {f: ratio(quantized_row.get(f), baseline_row.get(f)) for f in figures
            if quantized_row.get(f) is not None and baseline_row.get(f) is not None}
