"""Measure one target on one exported model: load, check agreement with PyTorch, time, read memory.

Run in-process (measure_target) or, so that peak RSS and GPU memory belong to this target alone and no other
backend's threads or caches are around, in a fresh process per target. measure_interleaved times several models on
one target in alternation (A/B), for ratios that a busy machine biases least:

  python -m src.deploy.worker SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .memory import MB, current_rss_mb, peak_rss_mb, reset_peak_rss

SPEC_KEYS = ("target", "artifact", "inputs", "refs", "batch", "num_runs", "warmup", "min_agreement",
             "openvino_int8_hint")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}".rstrip(": ")


def _cuda_used_bytes() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def measure_target(spec: dict) -> dict:
    """Row for spec['target'] on spec['artifact']: status ok | refused | failed, agreement, latency, memory."""
    from .agreement import compare_outputs
    from .backends import make_runner, target
    from .stats import latency_stats
    from .timing import time_runs

    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"worker spec lacks {', '.join(missing)}")
    t = target(spec["target"])
    row = {"target": t.name, "family": t.family, "device": t.device, "precision": t.precision, "status": "failed"}
    inputs = list(np.load(spec["inputs"]).values())
    refs = list(np.load(spec["refs"]).values())
    cuda = t.device == "cuda"
    try:
        if cuda:
            import torch

            torch.cuda.init()
            torch.cuda.synchronize()
            used0 = _cuda_used_bytes()
            torch.cuda.reset_peak_memory_stats()
        row["peak_rss_reset"] = reset_peak_rss()
        row["rss_base_mb"] = current_rss_mb()
        t0 = time.perf_counter()
        runner = make_runner(t, Path(spec["artifact"]), spec["openvino_int8_hint"])
        row["load_s"] = time.perf_counter() - t0
        row["inference_precision"] = runner.inference_precision()
        row["notes"] = runner.notes
        outs = [runner.infer(x) for x in inputs]
        row["agreement"] = compare_outputs(refs, outs, t.precision, spec["min_agreement"])
        if not row["agreement"]["passed"]:
            a = row["agreement"]
            row["status"] = "refused"
            row["reason"] = (f"disagrees with PyTorch (max|Δbox| {a['max_abs_box']:.3g} px, max|Δscore| "
                             f"{a['max_abs_score']:.3g}, detection agreement {a['det_agreement']:.2f}); "
                             f"criterion {a['criterion']}")
        else:
            runner.bind(inputs[0])
            clock = runner.clock()
            samples = time_runs(runner.run, spec["num_runs"], spec["warmup"], clock)
            row.update(latency_stats(samples, spec["batch"]))
            row["clock"] = clock.name
            row["status"] = "ok"
        row["peak_rss_mb"] = peak_rss_mb()
        if row["rss_base_mb"] is not None:
            row["added_rss_mb"] = row["peak_rss_mb"] - row["rss_base_mb"]
        if cuda:
            torch.cuda.synchronize()
            row["gpu_mem_mb"] = (_cuda_used_bytes() - used0) / MB
            row["torch_peak_alloc_mb"] = torch.cuda.max_memory_allocated() / MB
    except Exception as e:  # noqa: BLE001 - one target failing must not stop the others
        row["status"] = "failed"
        row["reason"] = _one_line(e)
        if os.environ.get("YOLO_TQ_DEBUG"):
            row["traceback"] = traceback.format_exc()
    return row


def measure_interleaved(spec: dict) -> dict:
    """A/B timing of one target on several models (spec['models']: [{'model', 'artifact'}]) in one process: each
    iteration runs every model once, in an order that rotates, so slow changes in machine load hit all alike.
    Returns per-model latency stats and, per model, the median over iterations of its time / the first model's."""
    from .backends import make_runner, target
    from .stats import latency_stats

    t = target(spec["target"])
    x = next(iter(np.load(spec["inputs"]).values()))
    names = [m["model"] for m in spec["models"]]
    try:
        runners = [make_runner(t, Path(m["artifact"]), spec["openvino_int8_hint"]) for m in spec["models"]]
        clocks = [r.clock() for r in runners]
        for r in runners:
            r.bind(x)
            for _ in range(spec["warmup"]):
                r.run()
        samples: list[list[float]] = [[] for _ in runners]
        order = list(range(len(runners)))
        for _ in range(spec["num_runs"]):
            for i in order:
                clocks[i].start()
                runners[i].run()
                samples[i].append(clocks[i].stop())
            order = order[1:] + order[:1]
    except Exception as e:  # noqa: BLE001
        return {"target": t.name, "status": "failed", "reason": _one_line(e)}
    first = np.asarray(samples[0])
    return {"target": t.name, "status": "ok", "clock": clocks[0].name,
            "stats": {n: latency_stats(s, spec["batch"]) for n, s in zip(names, samples)},
            "paired_median_ratio": {n: float(np.median(np.asarray(s) / first)) for n, s in zip(names, samples)}}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m src.deploy.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    row = measure_interleaved(spec) if "models" in spec else measure_target(spec)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=2, default=str))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
