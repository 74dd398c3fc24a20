"""Comparing checkpoints (FP baseline, BitLinear_TTQ, standard BitLinear): accuracy, size, theoretical compression.

Sizes and compression follow yolo_tq.eval.size (the paper's budget: FP32 baseline, 2 bits per ternary weight, 32 bits
per other parameter; ternary layers judged from the weights).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch.nn as nn

from ..io import atomic_write_text, write_json
from ..quant.layers import BitConv2d
from .size import BUDGETS, count, model_bits


def model_summary(model: nn.Module, baseline_params: int | None = None, budget=BUDGETS[0]) -> dict:
    """Parameters, ternary parameters, BitLinear layers, theoretical size and compression against a baseline with
    `baseline_params` parameters (the model itself when None)."""
    c = count(model)
    base = c["params"] if baseline_params is None else baseline_params
    bits = model_bits(c["params"], c["ternary_params"], budget.ternary_bits, budget.other_bits, c["int_params"],
                      c["int_weight_bits"])
    return {"params": c["params"], "ternary_params": c["ternary_params"], "ternary_convs": c["ternary_convs"],
            "bitlinear_layers": sum(isinstance(m, BitConv2d) for m in model.modules()),
            "theoretical_mb": bits / 8 / 1e6,
            "compression": base * budget.baseline_bits / bits}


def compare_checkpoints(entries: list[tuple[str, str]], data: str, imgsz: int = 640, batch: int = 16,
                        device: str | None = None, project: str | None = None) -> list[dict]:
    """One row per (name, checkpoint), the first being the baseline: validation metrics, parameters, file size and
    theoretical compression against the baseline."""
    from ..config import check_dataset, check_device
    from ..io import load_model
    from .validate import validate

    summaries, baseline_params = [], None
    for _, ckpt in entries:  # every file read, the data and device checked, before the first validation
        summaries.append(model_summary(load_model(ckpt)[0], baseline_params))
        baseline_params = baseline_params or summaries[-1]["params"]
    check_dataset(data)
    check_device(device)
    rows = []
    for (name, ckpt), summary in zip(entries, summaries):
        m = validate(ckpt, data, imgsz, batch, device, project=project)
        rows.append({"model": name, "checkpoint": str(ckpt), "mAP50": m["mAP50"], "mAP50-95": m["mAP50-95"],
                     "precision": m["precision"], "recall": m["recall"], **summary,
                     "file_mb": os.path.getsize(ckpt) / 1e6})
    return rows


COLUMNS = [("model", "model", "s"), ("mAP50", "mAP50", ".4f"), ("mAP50-95", "mAP50-95", ".4f"),
           ("precision", "P", ".4f"), ("recall", "R", ".4f"), ("params", "params", ",d"),
           ("ternary_params", "ternary", ",d"), ("file_mb", "file MB", ".2f"),
           ("theoretical_mb", "theor. MB", ".3f"), ("compression", "compression", ".3f")]


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
                                           for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def write_rows(rows: list[dict], json_path: str | Path, csv_path: str | Path, meta: dict | None = None) -> None:
    """The table as JSON ({meta..., budget, rows}) and CSV (one line per row), each written atomically."""
    write_json({**(meta or {}), "budget": BUDGETS[0].name, "rows": rows}, json_path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
