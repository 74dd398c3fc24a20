#!/usr/bin/env python
"""Deployable ONNX benchmark: bytes, accuracy through stock Ultralytics, OpenVINO, and latency of the low-bit ONNX.

For each model (the FP baseline and the ternary stage outputs, NAME=PATH): the deployable ONNX (export.py, INT8
rest) and the plain FP32 ONNX of the same model at every --sizes; mAP50-95 of both as `ultralytics.YOLO(onnx).val`
runs them (onnxruntime, batch 1, square letterbox); the PyTorch model with Ultralytics' rectangular batches
(validate.py, batch 16) and without them (rect=False, batch 1: the inputs the ONNX sees); OpenVINO reading the
deployable ONNX (FP32 hint and OpenVINO's default precision: agreement with onnxruntime, and mAP through an IR
converted from it); and, with --latency-runs, onnxruntime latency, peak RSS and load time of the deployable file
against the FP ONNX (the latency benchmark's onnxruntime-cpu-deploy target, A/A-checked).

Targets (issue 21): stages 1-3 <= 1.70 MB and + BitLinear_TTQ <= 1.60 MB at 640; deployable mAP within 0.002 of the
FP32 ONNX at 320 and 640; latency <= 1.05x the FP ONNX.

  python benchmarks/deploy_onnx.py --model stage3=PATH/stage3/ternary.pt --model c2psa=PATH/ternary.pt \\
      --out benchmarks/results/deploy_onnx.json
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from common import SHARED_WEIGHTS, parser, print_table, provenance

from yolo_tq.deploy.deployable import export_deployable
from yolo_tq.eval.validate import validate
from yolo_tq.io import write_json

TARGETS = {"stages 1-3": 1_700_000, "stages 1-3 + BitLinear_TTQ": 1_600_000}
MAP_TOLERANCE = 0.002


def pytorch_map(ckpt: str, data: str, imgsz: int, rect: bool, work: Path) -> float:
    """PyTorch mAP50-95: Ultralytics' default validation (rect batches of 16), or square letterbox batch 1."""
    if rect:
        return validate(ckpt, data, imgsz, 16, "cpu", project=str(work))["mAP50-95"]
    from ultralytics import YOLO

    m = YOLO(ckpt).val(data=data, imgsz=imgsz, batch=1, rect=False, device="cpu", plots=False, verbose=False,
                       project=str(work), name="rect_false", exist_ok=True)
    return float(m.box.map)


@contextlib.contextmanager
def openvino_precision(hint: str | None):
    """Make every OpenVINO compile_model in this process use `hint` (None: OpenVINO's own default), so Ultralytics'
    OpenVINO backend can be validated in FP32 as well as in the precision it picks."""
    import openvino as ov

    real = ov.Core.compile_model

    def compile_model(self, model, device_name=None, config=None):
        cfg = dict(config or {})
        if hint:
            cfg["INFERENCE_PRECISION_HINT"] = hint
        return real(self, model, device_name, cfg)

    ov.Core.compile_model = compile_model
    try:
        yield
    finally:
        ov.Core.compile_model = real


def openvino_checks(onnx_path: Path, data: str, imgsz: int, work: Path) -> dict:
    """OpenVINO on the deployable ONNX: read and compiled directly (bytes on disk = the ONNX), outputs against
    onnxruntime's on the check images, mAP through an IR converted from it (Ultralytics runs IR folders)."""
    try:
        import numpy as np
        import onnxruntime as ort
        import openvino as ov
        import yaml
        from ultralytics import YOLO

        from yolo_tq.eval.agreement import check_inputs
    except ImportError as e:
        return {"status": "skipped", "reason": f"{e.name} is not installed (pip install -e \".[deploy]\")"}
    out = {"status": "ok", "bytes_read": onnx_path.stat().st_size}
    try:
        inputs = check_inputs(data, imgsz, 1, 4)
        ref_s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        core = ov.Core()
        folder = work / f"{onnx_path.stem}_openvino_model"
        ir = ov.convert_model(str(onnx_path))
        ov.save_model(ir, str(folder / f"{onnx_path.stem}.xml"), compress_to_fp16=False)
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
        meta = {k: (yaml.safe_load(v) if k in ("imgsz", "names", "stride", "batch") else v) for k, v in meta.items()}
        (folder / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        out["ir_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        for label, hint in (("f32", "f32"), ("default", None)):
            compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                          {"INFERENCE_PRECISION_HINT": hint} if hint else {})
            diff = max(float(np.abs(compiled({0: x})[0] - ref_s.run(None, {"images": x})[0]).max()) for x in inputs)
            prec = compiled.get_property("INFERENCE_PRECISION_HINT")
            with openvino_precision(hint):
                m = YOLO(str(folder), task="detect").val(data=data, imgsz=imgsz, batch=1, device="cpu", plots=False,
                                                         verbose=False, project=str(work), name=f"ov_{label}",
                                                         exist_ok=True)
            out[label] = {"precision": str(prec), "max_abs_vs_onnxruntime": diff, "mAP50-95": float(m.box.map)}
    except Exception as e:  # noqa: BLE001 - OpenVINO's refusal, in one line
        msg = str(e).strip().splitlines()
        out.update(status="failed", reason=f"{type(e).__name__}: {next((x for x in msg if x.strip()), '')[:300]}")
    return out


def onnx_map(path: str, data: str, imgsz: int) -> float:
    return validate(path, data, imgsz, 1, "cpu")["mAP50-95"]


def measure_model(name: str, ckpt: str, data: str, sizes: list[int], work: Path, ov: bool) -> dict:
    row: dict = {"name": name, "checkpoint": ckpt}
    for size in sizes:
        d = work / name / str(size)
        r = export_deployable(ckpt, d / f"{name}.onnx", size, "int8", workdir=d / "work", data=data,
                              log=lambda s: None)
        fp_onnx = d / f"{name}_fp32.onnx"
        shutil.copy(r.fp_onnx, fp_onnx)
        row[size] = {"deploy_bytes": r.bytes, "fp_onnx_bytes": r.fp_onnx_bytes,
                     "ternary_layers": r.encoding["ternary"]["tensors"], "encoding": r.encoding,
                     "decode_errors": r.decode_errors, "pytorch_weight_rel_error": r.pytorch_weight_rel_error,
                     "outputs": r.outputs, "deploy_onnx": str(d / f"{name}.onnx"),
                     "mAP_deploy_onnx": onnx_map(str(d / f"{name}.onnx"), data, size),
                     "mAP_fp32_onnx": onnx_map(str(fp_onnx), data, size),
                     "mAP_pytorch_rect": pytorch_map(ckpt, data, size, True, d),
                     "mAP_pytorch_square": pytorch_map(ckpt, data, size, False, d)}
        if ov and size == max(sizes):
            row[size]["openvino"] = openvino_checks(d / f"{name}.onnx", data, size, d)
        print(f"{name} @{size}: {r.bytes:,} bytes, deploy {row[size]['mAP_deploy_onnx']:.4f}, FP32 ONNX "
              f"{row[size]['mAP_fp32_onnx']:.4f}, PyTorch rect {row[size]['mAP_pytorch_rect']:.4f} / square "
              f"{row[size]['mAP_pytorch_square']:.4f}", flush=True)
    return row


def latency(baseline: str, ckpt: str, data: str, imgsz: int, runs: int, work: Path) -> dict:
    """The latency benchmark on onnxruntime only: the plain ONNX pair and the deployable-vs-FP-ONNX pair."""
    from dataclasses import asdict

    from yolo_tq.deploy.bench import BenchOptions, run_benchmark

    r = run_benchmark(BenchOptions(baseline=baseline, quantized=ckpt, backends=("onnxruntime",), device="cpu",
                                   imgsz=imgsz, num_runs=runs, data=data, workdir=str(work)), log=lambda s: None)
    rows = {f"{x.model} {x.target}": {"status": x.status, "load_s": x.load_s,
                                      "median_ms": x.latency and x.latency.median_ms,
                                      "peak_rss_mb": x.memory and x.memory.peak_rss_mb,
                                      "added_rss_mb": x.memory and x.memory.added_rss_mb, "file_mb": x.file_mb}
            for x in r.rows}
    inter = {i.target: {"status": i.status, "reason": i.reason, "aa": list(i.aa_ratio()) if i.aa else None,
                        "ab": list(i.ab.ratio("quantized")) if i.ab and i.ab.status == "ok" else None}
             for i in r.interleaved}
    return {"imgsz": imgsz, "num_runs": runs, "rows": rows, "interleaved": inter,
            "environment": json.loads(json.dumps(asdict(r.environment)))}


def main() -> None:
    p = parser(__doc__, "data")
    p.add_argument("--baseline", default=str(SHARED_WEIGHTS), help="FP checkpoint (also measured, as 'FP')")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a model to measure (repeatable)")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--latency-runs", type=int, default=0, help="timed runs per model for latency (0: no latency)")
    p.add_argument("--latency-models", default="", help="comma list of NAMEs to time (default: every --model)")
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="JSON to write")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows and latency --out already holds (each with its own provenance); measure the rest")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="deploy_onnx_"))
    models = [("FP", a.baseline)] + [tuple(m.split("=", 1)) for m in a.model]
    result = {"provenance": provenance(), "sizes": a.sizes, "targets": TARGETS, "rows": [], "latency": {}}
    if a.resume and a.out and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        result["rows"] = [{(int(k) if k.isdigit() else k): v for k, v in r.items()} for r in old["rows"]]
        result["latency"] = old.get("latency", {})
    done = {r["name"] for r in result["rows"]}
    for name, ckpt in models:
        if name in done:
            print(f"{name}: kept from {a.out}")
            continue
        row = measure_model(name, ckpt, a.data, a.sizes, work, not a.no_openvino)
        result["rows"].append({**row, "provenance": provenance()})
        if a.out:
            write_json(result, a.out)
    timed = [n for n in a.latency_models.split(",") if n] or [n for n, _ in models[1:]]
    if a.latency_runs:
        for name, ckpt in models[1:]:
            if name in timed and name not in result["latency"]:
                result["latency"][name] = latency(a.baseline, ckpt, a.data, max(a.sizes), a.latency_runs,
                                                  work / f"latency_{name}")
                if a.out:
                    write_json(result, a.out)
    table = []
    for r in result["rows"]:
        row = {"model": r["name"]}
        for s in a.sizes:
            m = r[s]
            row.update({f"MB@{s}": m["deploy_bytes"] / 1e6, f"deploy@{s}": m["mAP_deploy_onnx"],
                        f"fp32onnx@{s}": m["mAP_fp32_onnx"], f"d@{s}": m["mAP_deploy_onnx"] - m["mAP_fp32_onnx"],
                        f"pt_rect@{s}": m["mAP_pytorch_rect"], f"pt_sq@{s}": m["mAP_pytorch_square"]})
        lat = result["latency"].get(r["name"], {}).get("interleaved", {}).get("onnxruntime-cpu-deploy")
        if lat:
            row["ratio"] = lat["ab"][0] if lat["ab"] else None
            row["aa"] = lat["aa"][0] if lat["aa"] else None
        table.append(row)
    cols = [("model", "model", "s")]
    for s in a.sizes:
        cols += [(f"MB@{s}", f"MB@{s}", ".3f"), (f"deploy@{s}", f"ONNX-2bit@{s}", ".4f"),
                 (f"fp32onnx@{s}", f"ONNX-FP32@{s}", ".4f"), (f"d@{s}", "Δ", "+.4f"),
                 (f"pt_rect@{s}", f"PT rect@{s}", ".4f"), (f"pt_sq@{s}", f"PT square@{s}", ".4f")]
    cols += [("ratio", "ORT A/B", ".3f"), ("aa", "A/A", ".3f")]
    print_table(table, cols)
    if a.out:
        print(f"JSON: {write_json(result, a.out)}")


if __name__ == "__main__":
    main()
