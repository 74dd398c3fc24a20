"""Measure one target on one exported model: load, check agreement with PyTorch, time, read memory.

Run in-process (measure_target) or, so that peak RSS and GPU memory belong to this target alone and no other
backend's threads or caches are around, in a fresh process per target. measure_interleaved times several models on
one target in alternation (an A/A check of the baseline against itself, then the A/B pass), for ratios that a
busy machine biases least:

  python -m yolo_tq.deploy.worker SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from .backends import Target, make_runner, target
from .measure import MB, current_rss_mb, peak_rss_mb, reset_peak_rss
from .results import ABResult, ABSpec, Memory, TargetRow, WorkerSpec, load_arrays, save_record


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}".rstrip(": ")


def _cuda_used_bytes() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def _cuda_start() -> int:
    """Initialise CUDA and reset its peak counter; returns the device memory in use before the target loads."""
    import torch

    torch.cuda.init()
    torch.cuda.synchronize()
    used = _cuda_used_bytes()
    torch.cuda.reset_peak_memory_stats()
    return used


def _memory(rss_base: float | None, reset: bool, cuda_used0: int | None) -> Memory:
    peak = peak_rss_mb()
    gpu = {}
    if cuda_used0 is not None:
        import torch

        torch.cuda.synchronize()
        gpu = {"gpu_mem_mb": (_cuda_used_bytes() - cuda_used0) / MB,
               "torch_peak_alloc_mb": torch.cuda.max_memory_allocated() / MB}
    return Memory(peak_rss_mb=peak, rss_base_mb=rss_base, added_rss_mb=None if rss_base is None else peak - rss_base,
                  peak_rss_reset=reset, **gpu)


def _measure(t: Target, spec: WorkerSpec, head: dict) -> TargetRow:
    from .agreement import compare_outputs
    from .measure import latency_stats, time_runs

    inputs, refs = load_arrays(spec.inputs), load_arrays(spec.refs)
    cuda_used0 = _cuda_start() if t.device == "cuda" else None
    reset, rss_base = reset_peak_rss(), current_rss_mb()
    t0 = time.perf_counter()
    runner = make_runner(t, Path(spec.artifact), spec.openvino_int8_hint)
    load_s = time.perf_counter() - t0
    agreement = compare_outputs(refs, [runner.infer(x) for x in inputs], t.precision, spec.min_agreement,
                                spec.activation_rounding)
    common = dict(head, load_s=load_s, inference_precision=runner.inference_precision(), notes=runner.notes,
                  agreement=agreement)
    if not agreement.passed:
        a = agreement
        reason = (f"disagrees with PyTorch (max|Δbox| {a.max_abs_box:.3g} px, max|Δscore| {a.max_abs_score:.3g}, "
                  f"detection agreement {a.det_agreement:.2f}); criterion {a.criterion}")
        return TargetRow(**common, status="refused", reason=reason, memory=_memory(rss_base, reset, cuda_used0))
    runner.bind(inputs[0])
    clock = runner.clock()
    latency = latency_stats(time_runs(runner.run, spec.num_runs, spec.warmup, clock), spec.batch)
    return TargetRow(**common, status="ok", clock=clock.name, latency=latency,
                     memory=_memory(rss_base, reset, cuda_used0))


def measure_target(spec: WorkerSpec) -> TargetRow:
    """Row for spec.target on spec.artifact: status ok | refused | failed, agreement, latency, memory."""
    t = target(spec.target)
    head = dict(model=spec.model, target=t.name, family=t.family, device=t.device, precision=t.precision,
                artifact=spec.artifact)
    try:
        return _measure(t, spec, head)
    except Exception as e:  # noqa: BLE001 - one target failing must not stop the others
        return TargetRow(**head, status="failed", reason=one_line(e),
                         traceback=traceback.format_exc() if os.environ.get("YOLO_TQ_DEBUG") else "")


def _alternate(runners: list, clocks: list, num_runs: int) -> list[list[float]]:
    """`num_runs` iterations; each runs every model once, in an order that rotates by one per iteration, so over
    a cycle of len(runners) iterations every model runs once in every position."""
    samples: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for _ in range(num_runs):
        for i in order:
            clocks[i].start()
            runners[i].run()
            samples[i].append(clocks[i].stop())
        order = order[1:] + order[:1]
    return samples


def measure_interleaved(spec: ABSpec) -> ABResult:
    """An interleaved pass (A/A or A/B) of one target on several models (spec.models: (model, artifact) pairs) in
    one process, so slow changes in machine load hit all alike. Returns per-model latency stats and, per model, the
    paired median ratio to the first model over rotation cycles (stats.cycle_ratios) with its bootstrap interval."""
    from .measure import cycle_ratios, latency_stats, median_interval

    t = target(spec.target)
    x = load_arrays(spec.inputs)[0]
    names = [model for model, _ in spec.models]
    try:
        runners = [make_runner(t, Path(artifact), spec.openvino_int8_hint) for _, artifact in spec.models]
        clocks = [r.clock() for r in runners]
        for r in runners:
            r.bind(x)
            for _ in range(spec.warmup):
                r.run()
        samples = _alternate(runners, clocks, spec.num_runs)
    except Exception as e:  # noqa: BLE001
        return ABResult(target=t.name, status="failed", reason=one_line(e), kind=spec.kind)
    paired = {n: median_interval(cycle_ratios(s, samples[0], len(runners))) for n, s in zip(names, samples)}
    return ABResult(target=t.name, status="ok", clock=clocks[0].name, kind=spec.kind,
                    stats={n: latency_stats(s, spec.batch) for n, s in zip(names, samples)},
                    paired_median_ratio={n: m for n, (m, _, _) in paired.items()},
                    ratio_interval={n: [lo, hi] for n, (_, lo, hi) in paired.items()})


def measure(spec: WorkerSpec | ABSpec) -> TargetRow | ABResult:
    return measure_interleaved(spec) if isinstance(spec, ABSpec) else measure_target(spec)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m yolo_tq.deploy.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    d = json.loads(Path(argv[0]).read_text())
    save_record(measure(ABSpec(**d) if "models" in d else WorkerSpec(**d)), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
