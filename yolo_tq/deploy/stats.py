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


# ------------------------------------------------------------------------------------------ interleaved (A/A, A/B)
AA_TOLERANCE = 0.03  # an A/A check (baseline against itself) must read 1.00 ± this for a target's A/B to count
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000


def cycle_ratios(test_s: Sequence[float], ref_s: Sequence[float], cycle: int) -> np.ndarray:
    """Per rotation cycle of an interleaved pass (`cycle` iterations, in which every model ran once in every
    position): sum of the test model's times / sum of the reference's. A model that runs right after the other
    pays for it (caches, thread pools waking up); over a full cycle both pay alike, so the ratio loses that bias.
    Falls back to per-iteration ratios when there is no full cycle."""
    t, r = np.asarray(test_s, np.float64), np.asarray(ref_s, np.float64)
    if t.shape != r.shape or t.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    n = t.size // cycle * cycle if cycle > 0 else 0
    if n == 0:
        return t / r
    return t[:n].reshape(-1, cycle).sum(axis=1) / r[:n].reshape(-1, cycle).sum(axis=1)


def median_interval(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, lower, upper): the median and its percentile-bootstrap interval at `level` (resampling the values
    with replacement, a fixed seed so a result file can be recomputed exactly)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no values")
    idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
    meds = np.median(v[idx], axis=1)
    lo, hi = np.percentile(meds, [50 * (1 - level), 50 * (1 + level)])
    return float(np.median(v)), float(lo), float(hi)


def within_band(value: float | None, tolerance: float = AA_TOLERANCE) -> bool:
    """True when an A/A ratio reads 1.00 ± tolerance (rounded to the 3 decimals it is reported with)."""
    return value is not None and abs(round(value, 3) - 1.0) <= tolerance + 1e-12
