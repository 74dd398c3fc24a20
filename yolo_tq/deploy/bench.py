"""The latency benchmark in the shape of Ultralytics' own: one loop over backends.TARGETS. Every export the runnable
targets need is made first; then per target both models are checked against PyTorch and timed back to back,
followed by the A/A check and the A/B pass (docs/method.md, "The latency benchmark")."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ConfigError, imgsz_problem
from ..eval.agreement import REDUCED_MIN_AGREEMENT, check_inputs
from ..eval.validate import Accuracy, validate
from . import backends
from ..machine import cpu_features, module_versions
from .backends import FAMILIES, TARGETS, Target, openvino_default_precision, reference_outputs, target
from .deployable import ExportError, export_artifact, prepare_checkpoint
from .measure import AA_TOLERANCE, file_bytes
from .results import (ABResult, BenchResult, Environment, Interleaved, Skip, TargetRow, WorkerSpec, comparisons,
                      progress_line, save_arrays)
from .worker import one_line, run_worker


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
        return "cuda" if backends.cuda_available() else "cpu"
    d = str(device).strip().lower()
    if d in ("cpu", "0", "cuda", "cuda:0", "gpu"):
        return "cpu" if d == "cpu" else "cuda"
    raise BenchError(f"--device must be cpu or 0 (one GPU), got {device!r}")


def check_options(o: BenchOptions) -> None:
    bad = [b for b in o.backends if b not in FAMILIES]
    for wrong, message in ((o.num_runs < 1 or o.warmup < 0, "--num-runs must be >= 1 and --warmup >= 0"),
                           (not 0 < o.aa_tolerance < 1, f"--aa-tolerance must be in (0, 1), got {o.aa_tolerance}"),
                           (imgsz_problem(o.imgsz), f"--{imgsz_problem(o.imgsz)}"),
                           (o.batch < 1, f"--batch must be >= 1, got {o.batch}"),
                           (bad, f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(FAMILIES)}")):
        if wrong:
            raise BenchError(message)
    for p in (o.baseline, o.quantized):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    if o.data and not Path(o.data).is_file():
        raise FileNotFoundError(f"data yaml not found: {o.data}")
    if o.measure_map and not o.data:
        raise BenchError("--map needs --data")


def _plan(o: BenchOptions, log) -> tuple[list[Target], list[Skip]]:
    """The targets that run here with `o`, and the skipped ones with their reasons (logged)."""
    skipped = [Skip(t.name, why) for t in TARGETS if (why := t.skip_reason(o))]
    for s in skipped:
        log(s.line())
    return [t for t in TARGETS if t.name not in {s.target for s in skipped}], skipped


def _prepare(o: BenchOptions, models: dict, runnable: list[Target], inputs: list[np.ndarray], work: Path, log):
    """Per model: the checkpoint the exporter takes, PyTorch's reference outputs, and every export the runnable
    targets need, all before any timing. Returns (model infos, (model, export key) -> (path, s) or the error)."""
    infos, artifacts = {}, {}
    for role, path in models.items():
        pm = prepare_checkpoint(path, work / role, role)
        save_arrays(work / role / "refs.npz", reference_outputs(pm.checkpoint, inputs))
        infos[role] = pm
        log(f"{role}: {pm.source} ({pm.kind}; {pm.summary['deploy']['ternary_convs']} of "
            f"{pm.summary['deploy']['fused_convs']} fused convs ternary per channel)")
        for key in dict.fromkeys(t.artifact_for(role) for t in runnable):
            try:
                artifacts[role, key] = export_artifact(pm, key, work / role, o.imgsz, o.batch, o.data, o.calib_split,
                                                       o.calib_fraction, o.verbose)
                if key != "pt":
                    log(f"{role}: exported {key} in {artifacts[role, key][1]:.1f} s")
            except ExportError as e:
                artifacts[role, key] = e
                log(f"{role}: {e}")
    return infos, artifacts


def _time(t: Target, models: list[tuple[str, str]], kind: str, o: BenchOptions, work: Path, folder: Path | None = None,
          **kw) -> TargetRow | ABResult:
    """One worker job on `t` (kind row: one model checked and timed; A/A or A/B: models in alternation) in `folder`."""
    spec = WorkerSpec(target=t.name, models=tuple(models), inputs=str(work / "inputs.npz"), batch=o.batch,
                      num_runs=o.num_runs, warmup=o.warmup, openvino_int8_hint=o.openvino_int8_hint, kind=kind, **kw)
    return run_worker(spec, folder or work, o.isolate)


def _time_model(t: Target, role: str, art, o: BenchOptions, work: Path, log, rounding: bool = False) -> TargetRow:
    """One model on one target (or the row of its failed export); `rounding`: the model rounds activations."""
    if isinstance(art, ExportError):
        row = TargetRow.of(t, role, status="failed", reason=str(art))
    else:
        path, export_s = art
        row = _time(t, [(role, str(path))], "row", o, work, work / role, refs=str(work / role / "refs.npz"),
                    min_agreement=o.min_agreement, activation_rounding=rounding)
        row = replace(row, artifact=str(path), export_s=export_s, file_bytes=file_bytes(path),
                      file_gz_bytes=file_bytes(path, compressed=True))
    log(progress_line(row))
    if row.agreement is not None and row.agreement.explanation:
        log(f"{'':<27} {row.agreement.explanation}")
    return row


def _interleave(t: Target, pair: list[TargetRow], o: BenchOptions, work: Path, log) -> Interleaved:
    """The A/A check (the baseline against a second copy of its export), then the A/B pass, each in one process."""
    base, quant = pair
    aa = _time(t, [("baseline", base.artifact), ("baseline-copy", base.artifact)], "A/A", o, work)
    ab = _time(t, [("baseline", base.artifact), ("quantized", quant.artifact)], "A/B", o, work)
    i = Interleaved.judged(t.name, aa, ab, o.aa_tolerance)
    log(progress_line(i))
    return i


def _validated(row: TargetRow, ov_default: str | None, o: BenchOptions, work: Path, log) -> TargetRow:
    """The row with its mAP, where Ultralytics' validator runs its export as it was timed (OpenVINO: only at the
    precision OpenVINO picks here by default)."""
    if row.family == "openvino" and (ov_default is None or row.inference_precision != ov_default):
        return replace(row, map_skipped="Ultralytics' validator would run this export in another configuration than "
                                        "the one timed")
    if not target(row.target).validated:
        return replace(row, map_skipped="not validated")
    project = work / row.model / row.target
    try:  # square letterboxes and the export batch: PyTorch and the exports see identical inputs
        acc = Accuracy.of(validate(row.artifact, o.data, o.imgsz, o.batch, "cpu" if o.device == "cpu" else 0,
                                   project=str(project), rect=False, log=project / "val.log"))
    except Exception as e:  # noqa: BLE001 - a failed validation is reported on its row
        log(f"{row.model:<9} {row.target:<17} mAP failed: {one_line(e)}")
        return replace(row, map_error=one_line(e))
    log(f"{row.model:<9} {row.target:<17} mAP50-95 {acc.map50_95:.4f}  mAP50 {acc.map50:.4f}")
    return replace(row, accuracy=acc)


def measure_maps(rows: list[TargetRow], o: BenchOptions, work: Path, log) -> list[TargetRow]:
    """Accuracy of the exports that ran, where Ultralytics' validator runs them as they were timed."""
    ov = next((r.artifact for r in rows if r.status == "ok" and r.family == "openvino"), None)
    ov_default = openvino_default_precision(ov) if ov else None  # a property of this CPU: any export tells
    return [_validated(r, ov_default, o, work, log) if r.status == "ok" else r for r in rows]


def run_benchmark(o: BenchOptions, log=print) -> BenchResult:
    """Exports, agreement checks, timing target by target (both models, then the A/A check and the A/B pass),
    optionally mAP; returns the typed result."""
    picked = o.device is None or not str(o.device).strip()
    o = replace(o, device=normalize_device(o.device))
    if picked:
        log(f"device: {o.device} (no --device given: " + ("PyTorch sees a CUDA GPU; --device cpu times the CPU "
            "targets)" if o.device == "cuda" else "PyTorch sees no CUDA GPU)"))
    check_options(o)
    work = (Path(o.workdir) if o.workdir else Path(tempfile.mkdtemp(prefix="yolo_tq_latency_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    env = Environment(python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                      cpu_features=cpu_features(), versions=module_versions(), loadavg_before=list(os.getloadavg()))
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
