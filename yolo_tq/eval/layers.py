"""Per-layer report of which convolutions are ternary or on an integer grid (LSQ), judged from the weights
themselves: a ternary weight holds at most {-Wn, 0, +Wp}; an integer one is q·step per output channel for integers
q of a signed 2..8-bit grid (formats.codes.grid_codes), and its bits are the smallest width that holds its codes."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..formats.codes import grid_codes
from ..quant.apply import is_quantized, scale_parameters
from ..quant.layers import BitConv2d
from ..quant.ternary import ternary_values


INT_WIDTHS = tuple(range(2, 9))  # integer grids the report recognises
LOG2_3 = math.log2(3)  # information in one ternary weight


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


@torch.no_grad()
def conv_rows(model: nn.Module) -> list[dict]:
    """One row per convolution: where it is, its shape, and whether its (effective) weight is ternary or on an
    integer grid (the DFL's fixed 0..15 projection is neither)."""
    rows = []
    dfl = tuple(p + "." for p, m in model.named_modules() if type(m).__name__ == "DFL")
    for path, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) and not is_quantized(m):
            continue
        w = m.weight.detach().float()
        vals = None if path.startswith(dfl) else ternary_values(w)
        distinct = int(torch.unique(w).numel()) if vals is None else int(vals.numel())
        grid = None if vals is not None or w.dim() < 2 or path.startswith(dfl) else grid_codes(w, INT_WIDTHS)
        row = {"layer": _layer_index(path), "path": path, "module": type(m).__name__,
               "shape": list(w.shape), "kernel": "x".join(map(str, w.shape[2:])), "params": w.numel(),
               "ternary": vals is not None, "kind": "ternary" if vals is not None else "int" if grid else "FP",
               "bits": LOG2_3 if vals is not None else grid[2] if grid else None,
               "distinct": distinct, "wp": None, "wn": None, "sparsity": None,
               "act_bits": m.spec.act_bits if isinstance(m, BitConv2d) else None}
        if vals is not None:
            row["wp"] = float(vals.max().clamp_min(0))
            row["wn"] = float((-vals.min()).clamp_min(0))
            row["sparsity"] = float((w == 0).float().mean())
        rows.append(row)
    return rows


def totals(model: nn.Module, rows: list[dict]) -> dict:
    """Counts and shares of ternary convs and parameters (scales Wp/Wn, Ap/An are not counted as parameters)."""
    scale_ids = {id(p) for p in scale_parameters(model)}
    params = sum(p.numel() for p in model.parameters() if id(p) not in scale_ids)
    tern_params = sum(r["params"] for r in rows if r["ternary"])
    n_tern = sum(r["ternary"] for r in rows)
    ints = [r for r in rows if r["kind"] == "int"]
    return {"convs": len(rows), "ternary_convs": n_tern, "ternary_conv_pct": 100.0 * n_tern / max(len(rows), 1),
            "params": params, "ternary_params": tern_params, "ternary_param_pct": 100.0 * tern_params / max(params, 1),
            "int_convs": len(ints), "int_params": sum(r["params"] for r in ints),
            "int_weight_bits": sum(r["params"] * r["bits"] for r in ints)}


def format_report(rows: list[dict], tot: dict, only_ternary: bool = False) -> str:
    head = f"{'layer':>5} {'module path':<34} {'type':<18} {'shape':<18} {'k':<4} {'kind':<7} {'bits':>4} {'vals':>6} " \
           f"{'Wp':>8} {'Wn':>8} {'zeros':>6} {'act':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if only_ternary and not r["ternary"]:
            continue
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        lines.append(f"{f(r['layer'], 'd'):>5} {r['path']:<34} {r['module']:<18} {str(tuple(r['shape'])):<18} "
                     f"{r['kernel']:<4} {r['kind'] + (str(r['bits']) if r['kind'] == 'int' else ''):<7} "
                     f"{f(r['bits'], '.2g') if r['kind'] != 'FP' else '32':>4} {r['distinct']:>6} "
                     f"{f(r['wp'], '.4f'):>8} {f(r['wn'], '.4f'):>8} {f(r['sparsity'], '.1%'):>6} "
                     f"{f(r['act_bits'], 'd'):>4}")
    lines.append("")
    lines.append(f"ternary convs: {tot['ternary_convs']} / {tot['convs']} ({tot['ternary_conv_pct']:.1f}%)")
    lines.append(f"ternary parameters: {tot['ternary_params']:,} / {tot['params']:,} ({tot['ternary_param_pct']:.1f}%)")
    if tot["int_convs"]:
        lines.append(f"integer-grid convs: {tot['int_convs']}, {tot['int_params']:,} parameters at "
                     f"{tot['int_weight_bits'] / tot['int_params']:.2f} bits on average")
    return "\n".join(lines)
