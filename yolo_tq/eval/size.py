"""Model sizes: theoretical sizes and compression ratios, coverage and per-layer rows (pure functions over a
model), and the real files (checkpoints, the packed file) that `yolo-tq size` and `yolo-tq pack` report.

Ternary layers are judged from the weights themselves (yolo_tq.eval.layers.conv_rows). The original reports'
definition: baseline at 32 bits per parameter; quantized model at 2 bits per ternary weight and 32 bits per other
parameter. Parameters are the model's parameters without the learned ternary scales (Wp/Wn, Ap/An), as in
yolo_tq.eval.layers.totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from .layers import conv_rows, totals

LOG2_3 = math.log2(3)


@dataclass(frozen=True)
class BitBudget:
    """Bits per parameter: of the baseline, of a ternary weight, of every other parameter of the quantized model."""

    name: str
    baseline_bits: float
    ternary_bits: float
    other_bits: float


BUDGETS = (
    BitBudget("paper: FP32 baseline, 2-bit ternary", 32, 2, 32),
    BitBudget("FP32 baseline, log2(3)-bit ternary", 32, LOG2_3, 32),
    BitBudget("FP16 baseline, 2-bit ternary", 16, 2, 16),
    BitBudget("FP16 baseline, log2(3)-bit ternary", 16, LOG2_3, 16),
)


def model_bits(params: int, ternary_params: int, ternary_bits: float, other_bits: float, int_params: int = 0,
               int_weight_bits: float = 0.0) -> float:
    """Size in bits of a model with `params` parameters of which `ternary_params` are ternary and `int_params` on
    integer grids taking `int_weight_bits` bits together (each at its own width)."""
    if not (0 <= ternary_params and 0 <= int_params and ternary_params + int_params <= params):
        raise ValueError(f"ternary ({ternary_params}) and integer ({int_params}) parameters must fit in the total "
                         f"({params})")
    return ternary_params * ternary_bits + int_weight_bits + (params - ternary_params - int_params) * other_bits


def compression_ratio(baseline_params: int, params: int, ternary_params: int, budget: BitBudget = BUDGETS[0]) -> float:
    """Baseline bits / quantized bits under a bit budget."""
    return (baseline_params * budget.baseline_bits) / model_bits(params, ternary_params, budget.ternary_bits,
                                                                 budget.other_bits)


def count(model: nn.Module, rows: list[dict] | None = None) -> dict:
    """Parameter and conv counts, ternary ones judged from the weights (see yolo_tq.eval.layers.totals); `rows` are
    yolo_tq.eval.layers.conv_rows(model) if already computed."""
    return totals(model, conv_rows(model) if rows is None else rows)


def layer_rows(model: nn.Module, budget: BitBudget = BUDGETS[0], rows: list[dict] | None = None) -> list[dict]:
    """One row per yaml layer (model.model[i]): type, parameters, ternary parameters, convs, ternary convs, and the
    bits this layer takes under `budget` (Wp/Wn and other learned scales are not counted as parameters)."""
    from ..quant.apply import scale_parameters

    scale_ids = {id(p) for p in scale_parameters(model)}
    by_layer: dict[int, list[dict]] = {}
    for r in conv_rows(model) if rows is None else rows:
        if r["layer"] is not None:
            by_layer.setdefault(r["layer"], []).append(r)
    out = []
    for i, layer in enumerate(model.model):
        params = sum(p.numel() for p in layer.parameters() if id(p) not in scale_ids)
        convs = by_layer.get(i, [])
        tern = sum(r["params"] for r in convs if r["ternary"])
        ints = [r for r in convs if r["kind"] == "int"]
        int_params, int_bits = sum(r["params"] for r in ints), sum(r["params"] * r["bits"] for r in ints)
        out.append({"layer": i, "type": type(layer).__name__, "params": params, "ternary_params": tern,
                    "int_params": int_params, "convs": len(convs), "ternary_convs": sum(r["ternary"] for r in convs),
                    "int_convs": len(ints), "weight_bits": sorted({r["bits"] for r in ints}),
                    "bits": model_bits(params, tern, budget.ternary_bits, budget.other_bits, int_params, int_bits)})
    return out


def coverage(counts: dict) -> dict:
    """Share of parameters and of convs that are ternary, in percent."""
    return {"ternary_param_pct": counts["ternary_param_pct"], "ternary_conv_pct": counts["ternary_conv_pct"]}


def theoretical_sizes(baseline_params: int, params: int, ternary_params: int, budgets=BUDGETS, int_params: int = 0,
                      int_weight_bits: float = 0.0) -> list[dict]:
    """For each bit budget: baseline and quantized size in bytes, and their ratio (integer-grid weights at their
    own widths under every budget)."""
    out = []
    for b in budgets:
        base = baseline_params * b.baseline_bits / 8
        quant = model_bits(params, ternary_params, b.ternary_bits, b.other_bits, int_params, int_weight_bits) / 8
        out.append({"budget": b.name, "baseline_bits_per_param": b.baseline_bits,
                    "ternary_bits": b.ternary_bits, "other_bits": b.other_bits,
                    "baseline_bytes": base, "quantized_bytes": quant, "ratio": base / quant})
    return out


ORIGINAL_COUNTING = ("the original code's: conv weights only, 32 bits each in the baseline; in the quantized model "
                     "2 bits per ternary conv weight, 32 per other conv weight, and BitLinear weights not counted")


def original_conv_bits(model: nn.Module, bitlinear_bits: float = 0.0) -> float:
    """Bits of the model's conv weights as the original code counted them: a plain conv weight is 2 bits per value
    when it is ternary (judged from the weights), 32 otherwise; a BitLinear layer's weight `bitlinear_bits` (the
    original's counter saw no Conv2d there, so 0); nothing else is counted."""
    from ..formats.packed import is_ternary_tensor
    from ..quant.layers import BitConv2d

    bits = 0.0
    for m in model.modules():
        if isinstance(m, BitConv2d):
            bits += m.latent_weight.numel() * bitlinear_bits
        elif type(m) is nn.Conv2d:
            bits += m.weight.numel() * (2 if is_ternary_tensor(m.weight) else 32)
    return bits


def original_ratio(baseline: nn.Module, quantized: nn.Module) -> dict:
    """The original reports' compression ratio (ORIGINAL_COUNTING), and the same with BitLinear weights at 2 bits."""
    base = original_conv_bits(baseline)
    return {"definition": ORIGINAL_COUNTING, "ratio": base / original_conv_bits(quantized),
            "ratio_bitlinear_at_2_bits": base / original_conv_bits(quantized, 2)}


def stock_ternary_model(model: nn.Module) -> nn.Module:
    """The model with every quantized training module (TTQConv2d, ...) replaced by its stock export; the model
    itself if it holds none."""
    from ..quant.apply import export_ternary, quantized_modules

    return export_ternary(model) if quantized_modules(model) else model


def size_report(baseline: nn.Module, quantized: nn.Module) -> dict:
    """Counts, per-layer rows, coverage and theoretical sizes of a baseline and a quantized model."""
    rb, rq = conv_rows(baseline), conv_rows(quantized)
    cb, cq = count(baseline, rb), count(quantized, rq)
    return {"baseline": {"counts": cb, "layers": layer_rows(baseline, rows=rb)},
            "quantized": {"counts": cq, "layers": layer_rows(quantized, rows=rq), "coverage": coverage(cq)},
            "theoretical": theoretical_sizes(cb["params"], cq["params"], cq["ternary_params"],
                                             int_params=cq["int_params"], int_weight_bits=cq["int_weight_bits"]),
            "original_counting": original_ratio(baseline, quantized)}


# ------------------------------------------------------------------------------------------ checkpoints and files
def _architecture(model: nn.Module) -> tuple:
    y = getattr(model, "yaml", None) or {}
    return (y.get("nc"), y.get("scale"), repr(y.get("backbone")), repr(y.get("head")))


def load_pair(baseline_path, quantized_path) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(baseline model, quantized model as stored, its stock ternary form) from two checkpoints of one
    architecture; the quantized one must hold ternary weights (judged from the weights)."""
    from ..io import CheckpointError, load_model

    baseline, _ = load_model(baseline_path)
    quantized, _ = load_model(quantized_path)
    if _architecture(baseline) != _architecture(quantized):
        raise CheckpointError(f"{baseline_path} and {quantized_path} are not the same architecture "
                              f"(yaml or number of classes differ)")
    if not any(r["kind"] != "FP" for r in conv_rows(quantized)):
        raise CheckpointError(f"{quantized_path} holds no ternary or integer-grid weights (judged from the weights): "
                              f"not a quantized checkpoint")
    return baseline, quantized, stock_ternary_model(quantized)


def stock_export_bytes(quantized_path, quantized: nn.Module, stock: nn.Module) -> int:
    """Bytes of the stock-YOLO ternary export: the file itself if it already is one, else the size that
    yolo_tq.io.save_stock_checkpoint writes for the exported model."""
    import os
    import tempfile

    from ..io import save_stock_checkpoint

    if stock is quantized:
        return os.path.getsize(quantized_path)
    with tempfile.TemporaryDirectory() as d:
        return os.path.getsize(save_stock_checkpoint(stock, os.path.join(d, "ternary.pt")))


def packed_sizes(stock: nn.Module, source: str | None) -> dict[str, bytes]:
    """The packed file of a stock ternary model with each rest precision: rest -> bytes."""
    from ..formats.metadata import REST_PRECISIONS
    from ..formats.packed import pack_bytes

    return {rest: pack_bytes(stock, rest, source=source) for rest in REST_PRECISIONS}


def real_file_sizes(baseline_path, quantized_path, quantized: nn.Module, stock: nn.Module,
                    packed: dict[str, bytes]) -> dict[str, int]:
    """Bytes on disk: baseline .pt, stock ternary export .pt, and the packed file with INT8 and FP16 rest."""
    import os

    return {"baseline_pt": os.path.getsize(baseline_path),
            "stock_ternary_export_pt": stock_export_bytes(quantized_path, quantized, stock),
            **{f"packed_ternary_{rest}_rest": len(data) for rest, data in packed.items()}}


def round_trip_line(path, rest: str, check: dict) -> str:
    """One line: the packed file, its size and its round-trip check (yolo_tq.formats.verify.verify_round_trip)."""
    import os

    return (f"packed: {path} ({os.path.getsize(path):,} bytes, rest {rest}); round trip: "
            f"{check['ternary_identical']}/{check['ternary']} ternary tensors identical, INT8 max error "
            f"{check['int8_max_err_steps']:.3f} step, FP16 max rel. error {check['fp16_max_rel_err']:.1e}")


def describe_packed(path) -> dict:
    """A packed file checked by rebuilding its model: path, bytes, ternary tensors and its metadata (no yaml)."""
    import os

    from ..formats.layout import entry_kinds
    from ..formats.reader import model_from_packed, read_packed

    tensors, meta = read_packed(path)
    model_from_packed(tensors, meta, source=str(path))
    kinds = entry_kinds(tensors)
    return {"path": str(path), "bytes": os.path.getsize(path),
            "ternary_tensors": sum(k == "ternary" for k in kinds.values()),
            **{k: v for k, v in meta.items() if k != "yaml"}}


def format_packed(d: dict) -> str:
    """One line of describe_packed's result."""
    return (f"{d['path']}: {d['bytes']:,} bytes, {d['model_class']} (nc={d['nc']}), ternary layers "
            f"{d['ternary_layers']}, {d['ternary_tensors']} ternary tensors, rest {d['rest_precision']}")


def validate_unpacked(packed_path, unpacked_pt, val_data, imgsz: int, batch: int, device,
                      source_ckpt=None) -> dict:
    """Unpack to an Ultralytics .pt (at `unpacked_pt`, else a temporary file) and, with `val_data`, validate it
    and the checkpoint it was packed from. Returns {'unpacked': row, 'before_packing': row} (rows present only
    when validated)."""
    import os
    import tempfile

    from ..formats.reader import unpack_to_checkpoint
    from .validate import validate

    with tempfile.TemporaryDirectory() as tmp:
        pt = unpack_to_checkpoint(packed_path, unpacked_pt or os.path.join(tmp, "unpacked.pt"))
        if not val_data:
            return {}
        rows = {"unpacked": validate(str(pt), val_data, imgsz, batch, device)}
    if source_ckpt:
        rows["before_packing"] = validate(str(source_ckpt), val_data, imgsz, batch, device)
    return rows


def format_size_report(rep: dict) -> str:
    """Human-readable tables of a size report (yolo-tq size)."""
    lines = [f"{'layer':>5} {'type':<10} {'params':>10} {'ternary':>10} {'integer':>10} {'int bits':>8} {'convs':>6} "
             f"{'tern':>5} {'bits (paper)':>13}"]
    for r in rep["quantized"]["layers"]:
        if r["params"]:
            widths = ",".join(str(b) for b in r["weight_bits"]) or "-"
            lines.append(f"{r['layer']:>5} {r['type']:<10} {r['params']:>10,} {r['ternary_params']:>10,} "
                         f"{r['int_params']:>10,} {widths:>8} {r['convs']:>6} {r['ternary_convs']:>5} "
                         f"{r['bits']:>13,.0f}")
    cb, cq = rep["baseline"]["counts"], rep["quantized"]["counts"]
    lines += ["", f"baseline parameters: {cb['params']:,}   quantized model parameters: {cq['params']:,}",
              f"coverage: {cq['ternary_params']:,} ternary parameters ({cq['ternary_param_pct']:.1f}%), "
              f"{cq['ternary_convs']} / {cq['convs']} convs ({cq['ternary_conv_pct']:.1f}%); integer grids: "
              f"{cq['int_params']:,} parameters in {cq['int_convs']} convs", "",
              f"{'theoretical size':<38} {'baseline MB':>12} {'quantized MB':>13} {'ratio':>7}"]
    for t in rep["theoretical"]:
        lines.append(f"{t['budget']:<38} {t['baseline_bytes'] / 1e6:>12.3f} {t['quantized_bytes'] / 1e6:>13.3f} "
                     f"{t['ratio']:>6.2f}x")
    o = rep.get("original_counting")
    if o:
        lines += [f"{'original counting (conv weights only)':<38} {'':>12} {'':>13} {o['ratio']:>6.2f}x",
                  f"  ({o['definition']}; with BitLinear weights at 2 bits: {o['ratio_bitlinear_at_2_bits']:.2f}x)"]
    lines += ["", f"{'real file':<38} {'bytes':>12} {'MB':>8} {'vs baseline':>12}"]
    base = rep["files"]["baseline_pt"]
    for name, b in rep["files"].items():
        if b is not None:
            lines.append(f"{name:<38} {b:>12,} {b / 1e6:>8.3f} {base / b:>11.2f}x")
    return "\n".join(lines)
