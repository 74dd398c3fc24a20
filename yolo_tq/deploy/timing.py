"""The timing loop and its clocks: perf_counter on CPU (after an optional device synchronisation), CUDA events on a
CUDA stream. A clock's `start()` / `stop()` bracket one run; `stop()` returns that run's seconds."""

from __future__ import annotations

import time
from typing import Any, Callable


class PerfCounterClock:
    """Wall clock (time.perf_counter). `sync`, if given, is called before reading the clock at both ends, so work
    queued on an asynchronous device is inside the measured interval."""

    name = "perf_counter"

    def __init__(self, sync: Callable[[], Any] | None = None):
        self.sync = sync
        self._t0 = 0.0
        if sync is not None:
            self.name = "perf_counter+sync"

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - self._t0


class CudaEventClock:
    """CUDA events recorded on `stream` (torch's current stream if None): the GPU's own time between the two
    events, read after synchronising on the end event."""

    name = "cuda_events"

    def __init__(self, stream=None):
        import torch

        self.stream = stream
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._start.record(self.stream)

    def stop(self) -> float:
        self._end.record(self.stream)
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3


def time_runs(run: Callable[[], Any], num_runs: int, warmup: int, clock=None) -> list[float]:
    """Call `run` `warmup` times untimed, then `num_runs` times timed; returns the per-run seconds."""
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    clock = clock or PerfCounterClock()
    for _ in range(warmup):
        run()
    if warmup and hasattr(clock, "sync") and clock.sync is not None:
        clock.sync()
    samples = []
    for _ in range(num_runs):
        clock.start()
        run()
        samples.append(clock.stop())
    return samples
