"""Measure one target on one exported model (load, agreement with PyTorch, timing, memory), or several models on one
target in alternation (the A/A and A/B passes), here or in a fresh process per job so that its memory figures and
threads belong to that target alone: python -m yolo_tq.deploy.worker SPEC.json RESULT.json"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..eval.agreement import compare_outputs
from ..io import atomic_write_text
from .backends import target
from .measure import MemoryMeter, cycle_ratios, latency_stats, median_interval, time_interleaved
from .results import ABResult, TargetRow, WorkerSpec, load_arrays, save_record


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}".rstrip(": ")


def _measure_row(t, spec: WorkerSpec) -> TargetRow:
    (model, artifact), = spec.models
    inputs, refs = load_arrays(spec.inputs), load_arrays(spec.refs)
    meter, t0 = MemoryMeter(cuda=t.device == "cuda"), time.perf_counter()
    runner = t.runner(artifact, spec.openvino_int8_hint)
    row = dict(artifact=artifact, load_s=time.perf_counter() - t0, inference_precision=runner.precision,
               notes=runner.notes)
    a = row["agreement"] = compare_outputs(refs, [runner.infer(x) for x in inputs], t.precision, spec.min_agreement,
                                           spec.activation_rounding)
    if not a.passed:
        reason = (f"disagrees with PyTorch (max|Δbox| {a.max_abs_box:.3g} px, max|Δscore| {a.max_abs_score:.3g}, "
                  f"detection agreement {a.det_agreement:.2f}); criterion {a.criterion}")
        return TargetRow.of(t, model, **row, status="refused", reason=reason, memory=meter.read())
    clock = runner.clock()
    latency = latency_stats(time_interleaved([runner.bind(inputs[0])], [clock], spec.num_runs, spec.warmup)[0],
                            spec.batch)
    return TargetRow.of(t, model, **row, status="ok", clock=clock.name, latency=latency, memory=meter.read())


def _measure_pass(t, spec: WorkerSpec) -> ABResult:
    """All models in alternation in one process, so that slow changes in load hit all alike: per model its latency
    and its paired median ratio to the first model, with its interval."""
    x, names = load_arrays(spec.inputs)[0], [model for model, _ in spec.models]
    runners = [t.runner(artifact, spec.openvino_int8_hint) for _, artifact in spec.models]
    clocks = [r.clock() for r in runners]
    samples = time_interleaved([r.bind(x) for r in runners], clocks, spec.num_runs, spec.warmup)
    paired = {n: median_interval(cycle_ratios(s, samples[0], len(runners))) for n, s in zip(names, samples)}
    return ABResult(target=t.name, status="ok", clock=clocks[0].name, kind=spec.kind,
                    stats={n: latency_stats(s, spec.batch) for n, s in zip(names, samples)},
                    paired_median_ratio={n: m for n, (m, _, _) in paired.items()},
                    ratio_interval={n: [lo, hi] for n, (_, lo, hi) in paired.items()})


def _failed(spec: WorkerSpec, reason: str, trace: str = "") -> TargetRow | ABResult:
    if spec.kind != "row":
        return ABResult(spec.target, "failed", reason, kind=spec.kind)
    (model, artifact), = spec.models
    return TargetRow.of(target(spec.target), model, artifact=artifact, status="failed", reason=reason, traceback=trace)


def measure(spec: WorkerSpec) -> TargetRow | ABResult:
    """spec.kind "row": the TargetRow (ok | refused | failed: agreement, latency, memory); "A/A" or "A/B": the
    interleaved pass (ABResult, ok | failed)."""
    t = target(spec.target)
    try:
        return _measure_row(t, spec) if spec.kind == "row" else _measure_pass(t, spec)
    except Exception as e:  # noqa: BLE001 - one target failing must not stop the others
        return _failed(spec, one_line(e), traceback.format_exc() if os.environ.get("YOLO_TQ_DEBUG") else "")


def run_worker(spec: WorkerSpec, folder: Path, isolate: bool) -> TargetRow | ABResult:
    """Measure `spec` here, or in a fresh `python -m yolo_tq.deploy.worker` (the installed package) run in `folder`."""
    if not isolate:
        return measure(spec)
    stem = spec.target + {"row": "", "A/A": ".aa", "A/B": ".ab"}[spec.kind]
    spec_path, out_path = folder / f"{stem}.spec.json", folder / f"{stem}.result.json"
    save_record(spec, spec_path)
    out_path.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-m", "yolo_tq.deploy.worker", str(spec_path), str(out_path)], cwd=folder,
                       env=dict(os.environ, YOLO_OFFLINE="1", YOLO_VERBOSE="False"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    atomic_write_text(folder / f"{stem}.log", p.stdout)
    if p.returncode != 0 or not out_path.is_file():
        tail = p.stdout.strip().splitlines()
        return _failed(spec, f"worker exited {p.returncode}: {tail[-1] if tail else 'no output'}")
    d = json.loads(out_path.read_text())
    return TargetRow.from_dict(d) if spec.kind == "row" else ABResult.from_dict(d)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m yolo_tq.deploy.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    save_record(measure(WorkerSpec(**json.loads(Path(argv[0]).read_text()))), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
