"""Per-layer report of which convolutions are ternary, judged from the weights themselves."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.apply import is_quantized, scale_parameters
from ..quant.layers import BitConv2d
from ..quant.ternary import ternary_values


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


@torch.no_grad()
def conv_rows(model: nn.Module) -> list[dict]:
    """One row per convolution: where it is, its shape, and whether its (effective) weight is ternary."""
    rows = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) and not is_quantized(m):
            continue
        w = m.weight.detach().float()
        vals = ternary_values(w)
        distinct = int(torch.unique(w).numel()) if vals is None else int(vals.numel())
        row = {"layer": _layer_index(path), "path": path, "module": type(m).__name__,
               "shape": list(w.shape), "kernel": "x".join(map(str, w.shape[2:])), "params": w.numel(),
               "ternary": vals is not None, "distinct": distinct, "wp": None, "wn": None, "sparsity": None,
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
    return {"convs": len(rows), "ternary_convs": n_tern, "ternary_conv_pct": 100.0 * n_tern / max(len(rows), 1),
            "params": params, "ternary_params": tern_params, "ternary_param_pct": 100.0 * tern_params / max(params, 1)}


def format_report(rows: list[dict], tot: dict, only_ternary: bool = False) -> str:
    head = f"{'layer':>5} {'module path':<34} {'type':<18} {'shape':<18} {'k':<4} {'kind':<7} {'vals':>6} " \
           f"{'Wp':>8} {'Wn':>8} {'zeros':>6} {'act':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if only_ternary and not r["ternary"]:
            continue
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        lines.append(f"{f(r['layer'], 'd'):>5} {r['path']:<34} {r['module']:<18} {str(tuple(r['shape'])):<18} "
                     f"{r['kernel']:<4} {'ternary' if r['ternary'] else 'FP':<7} {r['distinct']:>6} "
                     f"{f(r['wp'], '.4f'):>8} {f(r['wn'], '.4f'):>8} {f(r['sparsity'], '.1%'):>6} "
                     f"{f(r['act_bits'], 'd'):>4}")
    lines.append("")
    lines.append(f"ternary convs: {tot['ternary_convs']} / {tot['convs']} ({tot['ternary_conv_pct']:.1f}%)")
    lines.append(f"ternary parameters: {tot['ternary_params']:,} / {tot['params']:,} ({tot['ternary_param_pct']:.1f}%)")
    return "\n".join(lines)
