#!/usr/bin/env python
"""Size benchmark: bytes on disk of yolo11n and its ternary stage models in every format, and mAP after unpacking.

For the FP baseline (../shared) and the stage 1, 1-2, 1-3 ternary exports (from the retention benchmark, or
post-training ternary ones with --ptq): bytes of the .pt, of an ONNX FP32 export (Ultralytics), of the packed file
with INT8 and with FP16 for the non-ternary weights; mAP50-95 on the coco128 val half before packing and after
unpacking each packed file (Ultralytics validator, CPU). The FP baseline has no ternary weights; its packed rows are
plain INT8 / FP16 per-channel packing of the FP model, for comparison with Ultralytics' INT8 export.
Target: stage 1-3 packed with INT8 rest <= 1.6 MB (1e6 bytes) and mAP50-95 within 0.005 of the model before packing.

  python benchmarks/size.py                       # trained stage outputs of benchmarks/ttq_retention.py
  python benchmarks/size.py --ptq --out benchmarks/results/size_ptq.json   # post-training ternary models
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path

from common import REPO, SHARED_WEIGHTS, parser, print_table, provenance, require

from yolo_tq.config import load_config
from yolo_tq.eval.size import compression_ratio, count, stock_ternary_model
from yolo_tq.eval.validate import validate
from yolo_tq.formats import packed as packing
from yolo_tq.io import load_model, write_json
from yolo_tq.train.stages import post_training_ternary

RETENTION = REPO / "benchmarks" / "work" / "retention" / "checkpoints" / "yolo11n"
TARGET_BYTES = 1_600_000
TARGET_MAP_DROP = 0.005
REFERENCE = {"ultralytics_openvino_int8_weights_mb": 2.78, "note": "from the issue text, not measured by this script"}


def onnx_bytes(pt: Path, imgsz: int) -> int:
    """Bytes of Ultralytics' ONNX FP32 export of a checkpoint (exported from a copy in a temporary folder)."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / pt.name
        shutil.copy(pt, copy)
        out = YOLO(str(copy)).export(format="onnx", imgsz=imgsz, device="cpu", verbose=False)
        return os.path.getsize(out)


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "config", "data", "imgsz", "batch")
    p.add_argument("--baseline", default=str(SHARED_WEIGHTS), help="FP checkpoint")
    for n in (1, 2, 3):
        p.add_argument(f"--stage{n}", default=str(RETENTION / f"stage{n}" / "ternary.pt"),
                       help=f"stage 1-{n} ternary export (default: the retention benchmark's)")
    p.add_argument("--bitlinear", help="stage 1-3 + BitLinear_TTQ export, if there is one")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                   help="another ternary checkpoint to measure (repeatable)")
    p.add_argument("--ptq", action="store_true", help="use post-training ternary stage models made from --baseline "
                   "with --config instead of --stage1..3")
    p.add_argument("--skip-val", action="store_true", help="sizes only")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "size"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "size.json"))
    a = p.parse_args()
    for item in a.extra:
        if not item.partition("=")[1]:
            p.error(f"--extra takes NAME=PATH, got {item!r}")
    return a


def stage_name(kind: str, n: int) -> str:
    return f"{kind} stage{'s 1-' if n > 1 else ' '}{n}"


def models_to_measure(a, baseline: Path, work: Path) -> list[tuple[str, Path]]:
    """(name, checkpoint) of the FP baseline, the stage 1, 1-2, 1-3 ternary models (trained, or post-training ones
    made here with --ptq), --bitlinear and every --extra."""
    models = [("FP baseline", baseline)]
    if a.ptq:
        cfg = load_config(a.config, {"weights": str(baseline)})
        for n in (1, 2, 3):
            out = post_training_ternary(cfg, list(range(n)), str(baseline), work / f"ptq_stages_1-{n}.pt")
            models.append((stage_name("PTQ", n), out))
    else:
        for n in (1, 2, 3):
            models.append((stage_name("TTQ", n), require(getattr(a, f"stage{n}"), f"stage 1-{n} export")))
    if a.bitlinear:
        models.append(("TTQ stages 1-3 + BitLinear_TTQ", require(a.bitlinear, "BitLinear export")))
    for item in a.extra:
        name, _, path = item.partition("=")
        models.append((name, require(path, name)))
    return models


def pack_rows(row: dict, stock, path: Path, stem: str, work: Path, val, skip_val: bool) -> None:
    """Bytes and round-trip check of the INT8-rest and FP16-rest packed files, and mAP after unpacking each."""
    for rest in ("int8", "fp16"):
        packed = packing.write_packed(stock, work / f"{stem}.{rest}.safetensors", rest, source=path.name,
                                      require_ternary=False)
        tensors, meta = packing.read_packed(packed)
        check = packing.verify_round_trip(stock, packing.model_from_packed(tensors, meta), tensors)
        row[f"packed_{rest}_bytes"] = packed.stat().st_size
        row[f"round_trip_{rest}_ok"] = check["ok"]
        if not skip_val:
            pt = packing.unpack_to_checkpoint(packed, work / f"{stem}.{rest}.unpacked.pt")
            row[f"mAP50-95_unpacked_{rest}"] = val(pt)["mAP50-95"]


def measure(a, name: str, path: Path, base_params: int, work: Path, val) -> dict:
    """One model's row: parameter counts, bytes in every format, mAP before packing and after unpacking, targets."""
    model, _ = load_model(path)
    stock = stock_ternary_model(model)
    c = count(stock)
    row = {"name": name, "path": str(path), "params": c["params"], "ternary_params": c["ternary_params"],
           "theoretical_ratio": compression_ratio(base_params, c["params"], c["ternary_params"]),
           "pt_bytes": path.stat().st_size, "onnx_fp32_bytes": None if a.skip_onnx else onnx_bytes(path, a.imgsz)}
    pack_rows(row, stock, path, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"), work, val, a.skip_val)
    if not a.skip_val:
        row["mAP50-95"] = val(path)["mAP50-95"]
        row["mAP_drop_int8"] = row["mAP50-95"] - row["mAP50-95_unpacked_int8"]
    if c["ternary_params"] > 0 and name.endswith("stages 1-3"):
        row["target_bytes_met"] = row["packed_int8_bytes"] <= TARGET_BYTES
        if not a.skip_val and row["mAP50-95"] < 0.01:
            row["target_map_met"] = None
            row["target_map_note"] = "mAP50-95 before packing is about 0: the comparison says nothing"
        elif not a.skip_val:
            row["target_map_met"] = abs(row["mAP_drop_int8"]) <= TARGET_MAP_DROP
    return row


def print_sizes(rows: list[dict]) -> None:
    """The table, sizes in MB (1e6 bytes)."""
    mb = lambda v: None if v is None else v / 1e6  # noqa: E731
    table = [{**r, **{k: mb(r.get(k)) for k in ("pt_bytes", "onnx_fp32_bytes", "packed_int8_bytes",
                                                 "packed_fp16_bytes")}} for r in rows]
    print_table(table, [("name", "model", "s"), ("ternary_params", "ternary", ",d"),
                        ("theoretical_ratio", "ratio", ".2f"), ("pt_bytes", ".pt MB", ".3f"),
                        ("onnx_fp32_bytes", "ONNX MB", ".3f"), ("packed_int8_bytes", "int8 MB", ".3f"),
                        ("packed_fp16_bytes", "fp16 MB", ".3f"), ("mAP50-95", "mAP", ".4f"),
                        ("mAP50-95_unpacked_int8", "mAP int8", ".4f"), ("mAP50-95_unpacked_fp16", "mAP fp16", ".4f")])


def main() -> None:
    a = parse_args()
    baseline, data = require(a.baseline, "FP baseline"), require(a.data, "data yaml")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = models_to_measure(a, baseline, work)
    val = partial(validate, data=str(data), imgsz=a.imgsz, batch=a.batch, device="cpu", project=str(work / "val"))
    result = {"benchmark": "size", "provenance": provenance(), "ptq": a.ptq,
              "budget": {"data": str(data), "imgsz": a.imgsz, "batch": a.batch, "device": "cpu"},
              "targets": {"stage_1_3_int8_bytes_max": TARGET_BYTES, "map_drop_max": TARGET_MAP_DROP},
              "reference": REFERENCE, "rows": []}
    base_params = count(load_model(baseline)[0])["params"]
    for name, path in models:
        row = measure(a, name, Path(path), base_params, work, val)
        result["rows"].append(row)
        write_json(result, a.out)
        print(f"[size] {name}: pt {row['pt_bytes']:,}  int8 {row['packed_int8_bytes']:,}  "
              f"fp16 {row['packed_fp16_bytes']:,}", flush=True)
    print()
    print_sizes(result["rows"])
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
