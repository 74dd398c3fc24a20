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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .agreement import REDUCED_MIN_AGREEMENT, check_inputs
from .backends import FAMILIES, TARGETS, cpu_int8_features, make_runner, plan_targets, skip_line, target, versions
from .export import ExportError, captured_output, export_artifact, prepare_checkpoint
from .memory import compressed_size_mb, file_size_mb
from .stats import ratios

SCHEMA = "yolo-tq/latency/1"
REPO = Path(__file__).resolve().parents[2]


class BenchError(ConfigError):
    """Bad benchmark options (a ConfigError, so the CLIs print it as one line)."""


@dataclass
class BenchOptions:
    baseline: str
    quantized: str | None = None
    export_fp16: bool = False
    export_int8: bool = False
    num_runs: int = 50
    warmup: int = 10
    imgsz: int = 640
    batch: int = 1
    device: str = "cpu"
    backends: tuple[str, ...] = FAMILIES
    data: str | None = None
    workdir: str | None = None
    isolate: bool = True
    check_images: int = 8
    min_agreement: float = REDUCED_MIN_AGREEMENT
    calib_split: str = "train"
    calib_fraction: float = 1.0
    openvino_int8_hint: str | None = None  # None: OpenVINO's default for this CPU (what Ultralytics' val uses)
    interleave: bool = True  # also time baseline and quantized in alternation in one process (A/B ratios)
    measure_map: bool = False
    verbose: bool = False
    extra: dict = field(default_factory=dict)


def normalize_device(device: str) -> str:
    d = str(device).strip().lower()
    if d == "cpu":
        return "cpu"
    if d in ("0", "cuda", "cuda:0", "gpu"):
        return "cuda"
    raise BenchError(f"--device must be cpu or 0 (one GPU), got {device!r}")


def check_options(o: BenchOptions) -> None:
    if o.num_runs < 1 or o.warmup < 0:
        raise BenchError("--num-runs must be >= 1 and --warmup >= 0")
    if o.imgsz < 32 or o.imgsz % 32:
        raise BenchError(f"--imgsz must be a multiple of 32 (>= 32), got {o.imgsz}")
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


def _run_worker(spec: dict, folder: Path, isolate: bool) -> dict:
    from .worker import measure_interleaved, measure_target

    if not isolate:
        return measure_interleaved(spec) if "models" in spec else measure_target(spec)
    stem = spec["target"] + (".ab" if "models" in spec else "")
    spec_path = folder / f"{stem}.spec.json"
    out_path = folder / f"{stem}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, YOLO_OFFLINE="1", YOLO_VERBOSE="False",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with open(folder / f"{stem}.log", "w") as log:
        p = subprocess.run([sys.executable, "-m", "src.deploy.worker", str(spec_path), str(out_path)], cwd=REPO,
                           env=env, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0 or not out_path.is_file():
        tail = (folder / f"{stem}.log").read_text().strip().splitlines()
        return {"target": spec["target"], "status": "failed",
                "reason": f"worker exited {p.returncode}: {tail[-1] if tail else 'no output'}"}
    return json.loads(out_path.read_text())


def ov_default_precision(artifact: Path) -> str | None:
    """The inference precision OpenVINO picks on this CPU when not told (bf16 on CPUs with AMX / AVX512-BF16)."""
    from .backends import OpenVinoRunner

    try:
        return OpenVinoRunner(artifact, None).inference_precision()
    except Exception:  # noqa: BLE001
        return None


def map_runtime_matches(row: dict, ov_default: str | None) -> bool:
    """Ultralytics' validator runs an export the way its AutoBackend does; only rows timed in that same
    configuration get an mAP (OpenVINO: only the precision hint that is OpenVINO's default here)."""
    if row.get("status") != "ok":
        return False
    if row["family"] == "openvino":
        return ov_default is not None and row.get("inference_precision") == ov_default
    return row["target"] in ("torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda", "tensorrt-fp16",
                             "tensorrt-int8")


def validate_artifact(path: Path, data: str, imgsz: int, batch: int, device: str, project: Path) -> dict:
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
    p, r, map50, map5095 = m.box.mean_results()
    return {"mAP50": float(map50), "mAP50-95": float(map5095), "val_precision": float(p), "val_recall": float(r)}


def comparisons(rows: list[dict], interleaved: list[dict] | None = None) -> list[dict]:
    """Quantized vs baseline on the same target; and every quantized INT8 row vs each baseline row on its device
    (INT8 deployment of the ternary model against the FP32 baseline and against the baseline's own INT8 export).
    `ratios` come from the separate per-model runs; for the same target, `interleaved_ratios` from the A/B run."""
    ok = {(r["model"], r["target"]): r for r in rows if r.get("status") == "ok"}
    ab = {a["target"]: a for a in interleaved or [] if a.get("status") == "ok"}
    out = []

    def pair(q, b, kind):
        c = {"kind": kind, "quantized": q["target"], "baseline": b["target"], "ratios": ratios(q, b)}
        if q["target"] == b["target"] and q["target"] in ab:
            s = ab[q["target"]]
            c["interleaved_ratios"] = {**ratios(s["stats"]["quantized"], s["stats"]["baseline"],
                                                ("mean_ms", "median_ms", "p95_ms", "throughput_ips")),
                                       "paired_median": s["paired_median_ratio"]["quantized"]}
        if q.get("mAP50-95") is not None and b.get("mAP50-95") is not None:
            c["delta_mAP50-95"] = q["mAP50-95"] - b["mAP50-95"]
        out.append(c)

    for t in TARGETS:
        if ("quantized", t.name) in ok and ("baseline", t.name) in ok:
            pair(ok[("quantized", t.name)], ok[("baseline", t.name)], "same target")
    for (m, name), q in ok.items():
        if m != "quantized" or q["precision"] != "int8":
            continue
        for (m2, name2), b in ok.items():
            if m2 == "baseline" and name2 != name and b["device"] == q["device"]:
                pair(q, b, f"quantized int8 vs baseline {b['precision']}")
    return out


def _row_line(r: dict) -> str:
    head = f"{r['model']:<9} {r['target']:<17}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    a = r.get("agreement", {})
    mem = r.get("gpu_mem_mb") if r.get("device") == "cuda" else r.get("peak_rss_mb")
    return (f"{head} mean {r['mean_ms']:.2f} ms  median {r['median_ms']:.2f}  p95 {r['p95_ms']:.2f}  "
            f"{r['throughput_ips']:.1f} img/s  mem {mem:.0f} MB  max|Δ| {a.get('max_abs', 0):.3g}  "
            f"agree {a.get('det_agreement', 1):.2f}")


def run_benchmark(o: BenchOptions, log=print) -> dict:
    """Run everything the options ask for; returns the result dict (see check_result_schema)."""
    o.device = normalize_device(o.device)
    check_options(o)
    work = Path(o.workdir) if o.workdir else Path(tempfile.mkdtemp(prefix="yolo_tq_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "options": {k: v for k, v in asdict(o).items() if k != "extra"}, **o.extra,
              "environment": {"python": platform.python_version(), "machine": platform.machine(),
                              "cpu_count": os.cpu_count(), "cpu_features": cpu_int8_features(),
                              "versions": versions(), "loadavg_before": list(os.getloadavg())},
              "models": {}, "skipped": [], "rows": [], "interleaved": [], "comparisons": [], "workdir": str(work)}
    plan = plan_targets(o.device, o.export_fp16, o.export_int8, o.data, tuple(o.backends))
    for t, reason in plan:
        if reason:
            log(skip_line(t, reason))
            result["skipped"].append({"target": t.name, "reason": reason})
    runnable = [t for t, reason in plan if reason is None]
    inputs = check_inputs(o.data, o.imgsz, o.batch, o.check_images)
    np.savez(work / "inputs.npz", *inputs)
    models = [("baseline", o.baseline)] + ([("quantized", o.quantized)] if o.quantized else [])
    # 1. prepare, reference outputs, exports (all before any timing)
    prepared, artifacts = {}, {}
    for role, path in models:
        mdir = work / role
        prepared[role] = pm = prepare_checkpoint(path, mdir, role)
        np.savez(mdir / "refs.npz", *reference_outputs(pm.checkpoint, inputs))
        result["models"][role] = {"source": str(pm.source), "checkpoint": str(pm.checkpoint), "kind": pm.kind,
                                  "summary": pm.summary}
        log(f"{role}: {pm.source} ({pm.kind}; {pm.summary['deploy']['ternary_convs']} of "
            f"{pm.summary['deploy']['fused_convs']} fused convs ternary per channel)")
        for key in dict.fromkeys(t.artifact for t in runnable):
            try:
                artifacts[role, key] = export_artifact(pm, key, mdir, o.imgsz, o.batch, o.data, o.calib_split,
                                                       o.calib_fraction, o.verbose)
                if key != "pt":
                    log(f"{role}: exported {key} in {artifacts[role, key][1]:.1f} s")
            except ExportError as e:
                artifacts[role, key] = e
                log(f"{role}: {e}")
    # 2. timing, target by target, the baseline and quantized model back to back (slow drifts in machine load
    #    then bias the ratios least)
    for t in runnable:
        for role, _ in models:
            art, mdir = artifacts[role, t.artifact], work / role
            if isinstance(art, ExportError):
                row = {"target": t.name, "family": t.family, "device": t.device, "precision": t.precision,
                       "status": "failed", "reason": str(art)}
            else:
                spec = {"target": t.name, "artifact": str(art[0]), "inputs": str(work / "inputs.npz"),
                        "refs": str(mdir / "refs.npz"), "batch": o.batch, "num_runs": o.num_runs, "warmup": o.warmup,
                        "min_agreement": o.min_agreement, "openvino_int8_hint": o.openvino_int8_hint}
                row = {"family": t.family, "device": t.device, "precision": t.precision,
                       **_run_worker(spec, mdir, o.isolate)}
                row.update(artifact=str(art[0]), export_s=art[1], file_mb=file_size_mb(art[0]),
                           file_gz_mb=compressed_size_mb(art[0]))
            row = {"model": role, **row}
            result["rows"].append(row)
            log(_row_line(row))
        pair = [r for r in result["rows"][-len(models):] if r["status"] == "ok"]
        if o.interleave and len(models) == 2 and len(pair) == 2:
            spec = {"target": t.name, "models": [{"model": r["model"], "artifact": r["artifact"]} for r in pair],
                    "inputs": str(work / "inputs.npz"), "batch": o.batch, "num_runs": o.num_runs,
                    "warmup": o.warmup, "openvino_int8_hint": o.openvino_int8_hint}
            ab = _run_worker(spec, work, o.isolate)
            result["interleaved"].append(ab)
            if ab["status"] == "ok":
                q, b = ab["stats"]["quantized"], ab["stats"]["baseline"]
                log(f"{'A/B':<9} {t.name:<17} baseline {b['mean_ms']:.2f} ms, quantized {q['mean_ms']:.2f} ms "
                    f"(mean ratio {q['mean_ms'] / b['mean_ms']:.3f}, paired median ratio "
                    f"{ab['paired_median_ratio']['quantized']:.3f})")
            else:
                log(f"{'A/B':<9} {t.name:<17} failed: {ab.get('reason')}")
    result["environment"]["loadavg_after_timing"] = list(os.getloadavg())  # before our own validation load
    # 3. accuracy of the exports that ran, where Ultralytics' validator runs them as they were timed
    if o.measure_map:
        ov_default = None
        for row in result["rows"]:
            if row.get("status") != "ok":
                continue
            art = Path(row["artifact"])
            if row["family"] == "openvino" and ov_default is None:
                ov_default = ov_default_precision(art)
            if map_runtime_matches(row, ov_default):
                try:
                    row.update(validate_artifact(art, o.data, o.imgsz, o.batch, o.device,
                                                 work / row["model"] / row["target"]))
                    log(f"{row['model']:<9} {row['target']:<17} mAP50-95 {row['mAP50-95']:.4f}  "
                        f"mAP50 {row['mAP50']:.4f}")
                except Exception as e:  # noqa: BLE001 - a failed validation is reported on its row
                    row["map_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    log(f"{row['model']:<9} {row['target']:<17} mAP failed: {row['map_error']}")
            else:
                row["map_skipped"] = ("Ultralytics' validator would run this export in another configuration than "
                                      "the one timed" if row["family"] == "openvino" else "not validated")
    result["comparisons"] = comparisons(result["rows"], result["interleaved"])
    result["environment"]["loadavg_after"] = list(os.getloadavg())
    problems = check_result_schema(result)
    if problems:  # a bug, not a user error: keep the measurements, say what is wrong
        result["schema_problems"] = problems
        log(f"warning: result does not match schema {SCHEMA}: {'; '.join(problems)}")
    return result


# ------------------------------------------------------------------------------------------------ schema and table
_ROW_REQUIRED = {"model": str, "target": str, "family": str, "device": str, "precision": str, "status": str}
_OK_REQUIRED = {"runs": int, "mean_ms": float, "median_ms": float, "p95_ms": float, "throughput_ips": float,
                "peak_rss_mb": float, "file_mb": float, "clock": str, "agreement": dict}


def check_result_schema(r: dict) -> list[str]:
    """Problems with a result dict (empty list: it matches schema yolo-tq/latency/1)."""
    problems = []
    for key, typ in (("schema", str), ("options", dict), ("environment", dict), ("models", dict), ("skipped", list),
                     ("rows", list), ("interleaved", list), ("comparisons", list)):
        if not isinstance(r.get(key), typ):
            problems.append(f"'{key}' missing or not {typ.__name__}")
    if problems:
        return problems
    if r["schema"] != SCHEMA:
        problems.append(f"schema is {r['schema']!r}, expected {SCHEMA!r}")
    for k in ("loadavg_before", "cpu_features", "versions"):
        if k not in r["environment"]:
            problems.append(f"environment lacks '{k}'")
    for s in r["skipped"]:
        if not (isinstance(s.get("target"), str) and isinstance(s.get("reason"), str) and s["reason"]):
            problems.append(f"skipped entry without target/reason: {s}")
    for i, row in enumerate(r["rows"]):
        for k, typ in _ROW_REQUIRED.items():
            if not isinstance(row.get(k), typ):
                problems.append(f"rows[{i}].{k} missing or not {typ.__name__}")
        if row.get("status") not in ("ok", "refused", "failed"):
            problems.append(f"rows[{i}].status is {row.get('status')!r}")
        elif row["status"] == "ok":
            for k, typ in _OK_REQUIRED.items():
                v = row.get(k)
                if not (isinstance(v, typ) or (typ is float and isinstance(v, int))):
                    problems.append(f"rows[{i}].{k} missing or not {typ.__name__}")
            if row.get("runs") != r["options"].get("num_runs"):
                problems.append(f"rows[{i}] has {row.get('runs')} runs, options ask for {r['options'].get('num_runs')}")
        elif not row.get("reason"):
            problems.append(f"rows[{i}] is {row['status']} without a reason")
    for i, a in enumerate(r["interleaved"]):
        if a.get("status") == "ok":
            if not all(s.get("runs") == r["options"].get("num_runs") for s in a.get("stats", {}).values()):
                problems.append(f"interleaved[{i}] lacks stats with the requested number of runs")
        elif not a.get("reason"):
            problems.append(f"interleaved[{i}] failed without a reason")
    for i, c in enumerate(r["comparisons"]):
        if not (isinstance(c.get("quantized"), str) and isinstance(c.get("baseline"), str)
                and isinstance(c.get("ratios"), dict)):
            problems.append(f"comparisons[{i}] lacks quantized/baseline/ratios")
    return problems


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(r: dict) -> str:
    """The on-screen table: one line per (model, target), then the quantized/baseline ratios."""
    lines = []
    cols = f"{'model':<9} {'target':<17} {'prec':<5} {'status':<8} {'max|Δ|':>8} {'agree':>5} {'mean ms':>8} " \
           f"{'median':>8} {'p95':>8} {'img/s':>7} {'mem MB':>7} {'file MB':>7} {'gz MB':>6} {'mAP':>6}"
    lines += [cols, "-" * len(cols)]
    for row in r["rows"]:
        a = row.get("agreement") or {}
        mem = row.get("gpu_mem_mb") if row.get("device") == "cuda" else row.get("peak_rss_mb")
        lines.append(f"{row['model']:<9} {row['target']:<17} {row['precision']:<5} {row['status']:<8} "
                     f"{_fmt(a.get('max_abs'), '8.3g'):>8} {_fmt(a.get('det_agreement'), '5.2f'):>5} "
                     f"{_fmt(row.get('mean_ms'), '8.2f'):>8} {_fmt(row.get('median_ms'), '8.2f'):>8} "
                     f"{_fmt(row.get('p95_ms'), '8.2f'):>8} {_fmt(row.get('throughput_ips'), '7.1f'):>7} "
                     f"{_fmt(mem, '7.0f'):>7} {_fmt(row.get('file_mb'), '7.2f'):>7} "
                     f"{_fmt(row.get('file_gz_mb'), '6.2f'):>6} {_fmt(row.get('mAP50-95'), '6.4f'):>6}")
    ab = [c for c in r["comparisons"] if c.get("interleaved_ratios")]
    if ab:
        lines.append("")
        head = f"{'quantized / baseline, A/B interleaved':<36} {'mean':>6} {'median':>6} {'p95':>6} {'img/s':>6} " \
               f"{'paired':>6}"
        lines += [head, "-" * len(head)]
        for c in ab:
            q = c["interleaved_ratios"]
            lines.append(f"{c['quantized']:<36} {_fmt(q.get('mean_ms'), '6.3f'):>6} {_fmt(q.get('median_ms'), '6.3f'):>6} "
                         f"{_fmt(q.get('p95_ms'), '6.3f'):>6} {_fmt(q.get('throughput_ips'), '6.3f'):>6} "
                         f"{_fmt(q.get('paired_median'), '6.3f'):>6}")
    if r["comparisons"]:
        lines.append("")
        head = f"{'quantized / baseline, separate runs':<36} {'mean':>6} {'median':>6} {'p95':>6} {'img/s':>6} {'mem':>6} " \
               f"{'file':>6} {'gz':>6} {'ΔmAP':>7}"
        lines += [head, "-" * len(head)]
        for c in r["comparisons"]:
            q = c["ratios"]
            mem = q.get("gpu_mem_mb", q.get("peak_rss_mb"))
            lines.append(f"{c['quantized'] + ' / ' + c['baseline']:<36} {_fmt(q.get('mean_ms'), '6.3f'):>6} "
                         f"{_fmt(q.get('median_ms'), '6.3f'):>6} {_fmt(q.get('p95_ms'), '6.3f'):>6} "
                         f"{_fmt(q.get('throughput_ips'), '6.3f'):>6} {_fmt(mem, '6.3f'):>6} "
                         f"{_fmt(q.get('file_mb'), '6.3f'):>6} {_fmt(q.get('file_gz_mb'), '6.3f'):>6} "
                         f"{_fmt(c.get('delta_mAP50-95'), '+7.4f'):>7}")
    for s in r["skipped"]:
        lines.append(f"skip {s['target']}: {s['reason']}")
    return "\n".join(lines)


def write_result(r: dict, path: str | Path) -> Path:
    """Write the result JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(r, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
