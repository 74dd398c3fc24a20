"""The latency benchmark: for a baseline and a quantized checkpoint, export to every runnable target, check each
export against PyTorch, time it, and report latency, memory, file size and quantized/baseline ratios."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ConfigError, imgsz_problem
from ..eval.validate import box_metrics
from ..io import atomic_write_text
from .agreement import REDUCED_MIN_AGREEMENT, check_inputs
from .backends import (FAMILIES, TARGETS, Target, cpu_int8_features, make_runner, plan_targets, skip_line, target,
                       versions)
from . import deployable  # noqa: F401 - registers the onnx-deploy exporter with export_artifact
from .export import ExportError, captured_output, export_artifact, prepare_checkpoint
from .measure import AA_TOLERANCE, compressed_size_mb, file_size_mb, ratios, within_band
from .results import (CI_TEXT, ABResult, ABSpec, Accuracy, BenchResult, Comparison, Environment, Interleaved,
                      ModelInfo, Skip, TargetRow, WorkerSpec, fmt_cell, memory_mb, ratio_text, save_arrays,
                      save_record)

LATENCY_FIGURES = ("mean_ms", "median_ms", "p95_ms", "throughput_ips")


class BenchError(ConfigError):
    """Bad benchmark options (a ConfigError, so the CLIs print it as one line)."""


@dataclass(frozen=True)
class BenchOptions:
    baseline: str
    quantized: str | None = None
    export_fp16: bool = False
    export_int8: bool = False
    num_runs: int = 50
    warmup: int = 10
    imgsz: int = 640
    batch: int = 1
    device: str | None = None  # None: CUDA when PyTorch sees a GPU, else CPU (normalize_device)
    backends: tuple[str, ...] = FAMILIES
    data: str | None = None
    workdir: str | None = None
    isolate: bool = True
    check_images: int = 8
    min_agreement: float = REDUCED_MIN_AGREEMENT
    calib_split: str = "train"
    calib_fraction: float = 1.0
    openvino_int8_hint: str | None = None  # None: OpenVINO's default for this CPU (what Ultralytics' val uses)
    interleave: bool = True  # also time baseline and quantized in alternation in one process (A/A, then A/B)
    aa_tolerance: float = AA_TOLERANCE  # a target's A/B ratio counts only when its A/A reads 1.00 ± this
    measure_map: bool = False
    verbose: bool = False


def normalize_device(device: str | None) -> str:
    """"cpu" or "cuda". None (not given) picks as Ultralytics does: the GPU when PyTorch sees one, else the CPU."""
    if device is None or str(device).strip() == "":
        from . import backends

        return "cuda" if backends.cuda_available() else "cpu"
    d = str(device).strip().lower()
    if d == "cpu":
        return "cpu"
    if d in ("0", "cuda", "cuda:0", "gpu"):
        return "cuda"
    raise BenchError(f"--device must be cpu or 0 (one GPU), got {device!r}")


def check_options(o: BenchOptions) -> None:
    if o.num_runs < 1 or o.warmup < 0:
        raise BenchError("--num-runs must be >= 1 and --warmup >= 0")
    if not 0 < o.aa_tolerance < 1:
        raise BenchError(f"--aa-tolerance must be in (0, 1), got {o.aa_tolerance}")
    if imgsz_problem(o.imgsz):
        raise BenchError(f"--{imgsz_problem(o.imgsz)}")
    if o.batch < 1:
        raise BenchError(f"--batch must be >= 1, got {o.batch}")
    bad = [b for b in o.backends if b not in FAMILIES]
    if bad:
        raise BenchError(f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(FAMILIES)}")
    for p in (o.baseline, o.quantized):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    if o.data and not Path(o.data).is_file():
        raise FileNotFoundError(f"data yaml not found: {o.data}")
    if o.measure_map and not o.data:
        raise BenchError("--map needs --data")


def reference_outputs(checkpoint: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The PyTorch model's raw outputs (CPU, FP32, Conv+BN fused) on the check inputs."""
    runner = make_runner(target("torch-cpu"), checkpoint)
    return [runner.infer(x) for x in inputs]


def failed_row(t: Target, model: str, reason: str) -> TargetRow:
    return TargetRow(model=model, target=t.name, family=t.family, device=t.device, precision=t.precision,
                     status="failed", reason=reason)


def _run_worker(spec: WorkerSpec | ABSpec, folder: Path, isolate: bool) -> TargetRow | ABResult:
    """Measure in this process, or in a fresh `python -m yolo_tq.deploy.worker` (the installed package; run in the
    work folder) that reads the spec and writes its answer as JSON."""
    from .worker import measure

    if not isolate:
        return measure(spec)
    ab = isinstance(spec, ABSpec)
    stem = spec.target + ({"A/A": ".aa", "A/B": ".ab"}[spec.kind] if ab else "")
    spec_path, out_path = folder / f"{stem}.spec.json", folder / f"{stem}.result.json"
    save_record(spec, spec_path)
    out_path.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-m", "yolo_tq.deploy.worker", str(spec_path), str(out_path)], cwd=folder,
                       env=dict(os.environ, YOLO_OFFLINE="1", YOLO_VERBOSE="False"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    atomic_write_text(folder / f"{stem}.log", p.stdout)
    if p.returncode != 0 or not out_path.is_file():
        tail = p.stdout.strip().splitlines()
        reason = f"worker exited {p.returncode}: {tail[-1] if tail else 'no output'}"
        return ABResult(spec.target, "failed", reason, kind=spec.kind) if ab else \
            failed_row(target(spec.target), spec.model, reason)
    d = json.loads(out_path.read_text())
    return ABResult.from_dict(d) if ab else TargetRow.from_dict(d)


def ov_default_precision(artifact: Path) -> str | None:
    """The inference precision OpenVINO picks on this CPU when not told (bf16 on CPUs with AMX / AVX512-BF16)."""
    from .backends import OpenVinoRunner

    try:
        return OpenVinoRunner(artifact, None).inference_precision()
    except Exception:  # noqa: BLE001
        return None


def map_runtime_matches(row: TargetRow, ov_default: str | None) -> bool:
    """Ultralytics' validator runs an export the way its AutoBackend does; only rows timed in that same
    configuration get an mAP (OpenVINO: only the precision hint that is OpenVINO's default here)."""
    if row.status != "ok":
        return False
    if row.family == "openvino":
        return ov_default is not None and row.inference_precision == ov_default
    return target(row.target).validated


def validate_artifact(path: Path, data: str, imgsz: int, batch: int, device: str, project: Path) -> Accuracy:
    """mAP of an export (or checkpoint) on the val split with Ultralytics' validator, square letterbox (rect=False)
    and the export batch, so PyTorch and exported models see identical inputs."""
    import logging

    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    try:
        with captured_output(project / "val.log", verbose=False):
            LOGGER.setLevel(logging.WARNING)
            m = YOLO(str(path), task="detect").val(data=data, imgsz=imgsz, batch=batch, rect=False, plots=False,
                                                  device="cpu" if device == "cpu" else 0, verbose=False, split="val",
                                                  project=str(project), name="val", exist_ok=True)
    finally:
        LOGGER.setLevel(level)
    acc = box_metrics(m)
    return Accuracy(map50=acc["mAP50"], map50_95=acc["mAP50-95"], precision=acc["precision"], recall=acc["recall"])


def _validated(row: TargetRow, ov_default: str | None, o: BenchOptions, work: Path, log) -> TargetRow:
    if not map_runtime_matches(row, ov_default):
        return replace(row, map_skipped="Ultralytics' validator would run this export in another configuration than "
                                        "the one timed" if row.family == "openvino" else "not validated")
    from .worker import one_line

    try:
        acc = validate_artifact(Path(row.artifact), o.data, o.imgsz, o.batch, o.device, work / row.model / row.target)
    except Exception as e:  # noqa: BLE001 - a failed validation is reported on its row
        log(f"{row.model:<9} {row.target:<17} mAP failed: {one_line(e)}")
        return replace(row, map_error=one_line(e))
    log(f"{row.model:<9} {row.target:<17} mAP50-95 {acc.map50_95:.4f}  mAP50 {acc.map50:.4f}")
    return replace(row, accuracy=acc)


def measure_maps(rows: list[TargetRow], o: BenchOptions, work: Path, log) -> list[TargetRow]:
    """Accuracy of the exports that ran, where Ultralytics' validator runs them as they were timed."""
    ov_default, out = None, []
    for row in rows:
        if row.status == "ok" and row.family == "openvino" and ov_default is None:
            ov_default = ov_default_precision(Path(row.artifact))
        out.append(_validated(row, ov_default, o, work, log) if row.status == "ok" else row)
    return out


def interleaved_ratios(i: Interleaved) -> dict:
    """The accepted A/B figures of a target: latency ratios of the A/B pass's stats, the paired median ratio with
    its interval, and the A/A figure it was accepted on."""
    s, (med, lo, hi), (aa, aa_lo, aa_hi) = i.ab, i.ratio(), i.aa_ratio()
    return {**ratios(asdict(s.stats["quantized"]), asdict(s.stats["baseline"]), LATENCY_FIGURES),
            "paired_median": med, "paired_median_lo": lo, "paired_median_hi": hi, "aa_paired_median": aa,
            "aa_lo": aa_lo, "aa_hi": aa_hi}


def comparisons(rows: list[TargetRow], interleaved: list[Interleaved] = ()) -> list[Comparison]:
    """Quantized vs baseline on the same target; and every quantized INT8 row vs each baseline row on its device
    (INT8 deployment of the ternary model against the FP32 baseline and against the baseline's own INT8 export).
    `ratios` come from the separate per-model runs; for the same target, `interleaved_ratios` from the A/B pass
    where its A/A check accepted it."""
    ok = {(r.model, r.target): r for r in rows if r.status == "ok"}
    ab = {a.target: a for a in interleaved if a.status == "ok"}

    def pair(q: TargetRow, b: TargetRow, kind: str) -> Comparison:
        inter = interleaved_ratios(ab[q.target]) if q.target == b.target and q.target in ab else None
        dmap = q.accuracy.map50_95 - b.accuracy.map50_95 if q.accuracy and b.accuracy else None
        return Comparison(kind, q.target, b.target, ratios(q.figures(), b.figures()), inter, dmap)

    out = [pair(ok["quantized", t.name], ok["baseline", t.name], "same target") for t in TARGETS
           if ("quantized", t.name) in ok and ("baseline", t.name) in ok]
    for (m, name), q in ok.items():
        if m != "quantized" or q.precision != "int8":
            continue
        for (m2, name2), b in ok.items():
            if m2 == "baseline" and name2 != name and b.device == q.device:
                out.append(pair(q, b, f"quantized int8 vs baseline {b.precision}"))
    return out


def _row_line(r: TargetRow) -> str:
    head = f"{r.model:<9} {r.target:<17}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.reason}"
    lat, a = r.latency, r.agreement
    return (f"{head} mean {lat.mean_ms:.2f} ms  median {lat.median_ms:.2f}  p95 {lat.p95_ms:.2f}  "
            f"{lat.throughput_ips:.1f} img/s  mem {fmt_cell(memory_mb(r), '.0f')} MB  max|Δ| {a.max_abs:.3g}  "
            f"agree {a.det_agreement:.2f}")


# ----------------------------------------------------------------------------------------------------- the run
def _environment() -> Environment:
    return Environment(python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                       cpu_features=cpu_int8_features(), versions=versions(), loadavg_before=list(os.getloadavg()))


def _plan(o: BenchOptions, log) -> tuple[list[Target], list[Skip]]:
    plan = plan_targets(o.device, o.export_fp16, o.export_int8, o.data, tuple(o.backends))
    plan = [(t, reason or ("runs the quantized model's deployable ONNX against the baseline's (give --quantized)"
                           if t.baseline_artifact and not o.quantized else None)) for t, reason in plan]
    for t, reason in plan:
        if reason:
            log(skip_line(t, reason))
    return [t for t, reason in plan if reason is None], [Skip(t.name, reason) for t, reason in plan if reason]


def _prepare(o: BenchOptions, models: dict, runnable: list[Target], inputs: list[np.ndarray], work: Path, log):
    """Per model: the checkpoint the exporter takes, PyTorch's reference outputs, and every export the runnable
    targets need (all before any timing). Returns (model infos, (model, artifact key) -> (path, s) or the error)."""
    infos, artifacts = {}, {}
    for role, path in models.items():
        mdir = work / role
        pm = prepare_checkpoint(path, mdir, role)
        save_arrays(mdir / "refs.npz", reference_outputs(pm.checkpoint, inputs))
        infos[role] = ModelInfo(str(pm.source), str(pm.checkpoint), pm.kind, pm.summary)
        log(f"{role}: {pm.source} ({pm.kind}; {pm.summary['deploy']['ternary_convs']} of "
            f"{pm.summary['deploy']['fused_convs']} fused convs ternary per channel)")
        for key in dict.fromkeys(t.artifact_for(role) for t in runnable):
            try:
                artifacts[role, key] = export_artifact(pm, key, mdir, o.imgsz, o.batch, o.data, o.calib_split,
                                                       o.calib_fraction, o.verbose)
                if key != "pt":
                    log(f"{role}: exported {key} in {artifacts[role, key][1]:.1f} s")
            except ExportError as e:
                artifacts[role, key] = e
                log(f"{role}: {e}")
    return infos, artifacts


def _time_model(t: Target, role: str, art, o: BenchOptions, work: Path, log, rounding: bool = False) -> TargetRow:
    """One model on one target (or the row of its failed export); `rounding`: the model rounds activations."""
    if isinstance(art, ExportError):
        row = failed_row(t, role, str(art))
    else:
        path, export_s = art
        spec = WorkerSpec(target=t.name, model=role, artifact=str(path), inputs=str(work / "inputs.npz"),
                          refs=str(work / role / "refs.npz"), batch=o.batch, num_runs=o.num_runs, warmup=o.warmup,
                          min_agreement=o.min_agreement, openvino_int8_hint=o.openvino_int8_hint,
                          activation_rounding=rounding)
        row = replace(_run_worker(spec, work / role, o.isolate), artifact=str(path), export_s=export_s,
                      file_mb=file_size_mb(path), file_gz_mb=compressed_size_mb(path))
    log(_row_line(row))
    return row


def _time_pass(t: Target, models: list[tuple[str, str]], kind: str, o: BenchOptions, work: Path) -> ABResult:
    spec = ABSpec(target=t.name, models=tuple(models), inputs=str(work / "inputs.npz"), batch=o.batch,
                  num_runs=o.num_runs, warmup=o.warmup, openvino_int8_hint=o.openvino_int8_hint, kind=kind)
    return _run_worker(spec, work, o.isolate)


def _interleave(t: Target, pair: list[TargetRow], o: BenchOptions, work: Path, log) -> Interleaved:
    """The A/A check (the baseline's export against a second, independently loaded copy of itself), then the A/B
    pass (baseline and quantized), both interleaved alike in a fresh process. The A/B ratio counts only when the
    A/A reads 1.00 ± o.aa_tolerance."""
    base, quant = pair
    aa = _time_pass(t, [("baseline", base.artifact), ("baseline-copy", base.artifact)], "A/A", o, work)
    ab = _time_pass(t, [("baseline", base.artifact), ("quantized", quant.artifact)], "A/B", o, work)
    failed = [f"{p.kind} pass failed: {p.reason}" for p in (aa, ab) if p.status != "ok"]
    aa_r = aa.ratio("baseline-copy")
    if failed:
        i = Interleaved(t.name, "failed", "; ".join(failed), aa, ab)
    elif not within_band(aa_r[0], o.aa_tolerance):
        i = Interleaved(t.name, "refused", f"A/A check read {ratio_text(aa_r)}, outside 1.00 ± {o.aa_tolerance:g}: "
                                           "this target's timing is biased here", aa, ab)
    else:
        i = Interleaved(t.name, "ok", "", aa, ab)
    tail = "" if i.status == "ok" else f"; {i.status}: {i.reason}"
    log(f"{'A/A, A/B':<9} {t.name:<17} A/A {ratio_text(aa_r)}, A/B quantized/baseline "
        f"{ratio_text(ab.ratio('quantized'))} (paired median [{CI_TEXT}]){tail}")
    return i


def run_benchmark(o: BenchOptions, log=print) -> BenchResult:
    """Run everything the options ask for: exports, agreement checks, timing target by target (baseline and
    quantized back to back, then the A/A check and the A/B pass), optionally mAP; returns the typed result."""
    picked = o.device is None or not str(o.device).strip()
    o = replace(o, device=normalize_device(o.device))
    if picked:
        log(f"device: {o.device} (no --device given: " + ("PyTorch sees a CUDA GPU; --device cpu times the CPU "
            "targets)" if o.device == "cuda" else "PyTorch sees no CUDA GPU)"))
    check_options(o)
    work = (Path(o.workdir) if o.workdir else Path(tempfile.mkdtemp(prefix="yolo_tq_latency_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    created, env = time.strftime("%Y-%m-%dT%H:%M:%S%z"), _environment()
    runnable, skipped = _plan(o, log)
    inputs = check_inputs(o.data, o.imgsz, o.batch, o.check_images)
    save_arrays(work / "inputs.npz", inputs)
    models = {"baseline": o.baseline, **({"quantized": o.quantized} if o.quantized else {})}
    infos, artifacts = _prepare(o, models, runnable, inputs, work, log)
    rows, interleaved = [], []
    for t in runnable:  # slow drifts in machine load bias the ratios least with both models back to back
        pair = [_time_model(t, role, artifacts[role, t.artifact_for(role)], o, work, log,
                            infos[role].summary.get("activation_rounding", False)) for role in models]
        rows += pair
        if o.interleave and len(pair) == 2 and all(r.status == "ok" for r in pair):
            interleaved.append(_interleave(t, pair, o, work, log))
    after_timing = list(os.getloadavg())  # before our own validation load
    if o.measure_map:
        rows = measure_maps(rows, o, work, log)
    env = replace(env, loadavg_after_timing=after_timing, loadavg_after=list(os.getloadavg()))
    return BenchResult(created=created, options=asdict(o), environment=env, models=infos, skipped=skipped, rows=rows,
                       interleaved=interleaved, comparisons=comparisons(rows, interleaved), workdir=str(work))
