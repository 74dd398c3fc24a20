"""The run.sh report: summary.md, summary.json and plots from the JSON files the pipeline's steps wrote.

  python -m yolo_tq.pipeline RUN_DIR [--profile quick] [--size n]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .io import atomic_write_text, write_json

STEPS = [("fp", "FP baseline"), ("stage1", "Stage 1"), ("stage2", "Stage 1-2"), ("stage3", "Stage 1-3"),
         ("c2psa_ttq", "Stage 1-3 + BitLinear_TTQ"), ("c2psa_standard", "Stage 1-3 + standard BitLinear")]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _latency_ratio(lat: dict | None) -> dict:
    """Quantized/baseline median-latency ratio per target measured on the same target."""
    out = {}
    for c in (lat or {}).get("comparisons", []):
        if c.get("kind") == "same target" and c.get("ratios", {}).get("median_ms") is not None:
            out[c["quantized"]] = c["ratios"]["median_ms"]
    return out


def collect(run: Path) -> dict:
    res = run / "results"
    rows = []
    for key, label in STEPS:
        val = _load(res / f"val_{key}.json")
        comp = _load(res / f"compression_{key}.json")
        row = {"step": key, "name": label, "mAP50": None, "mAP50-95": None}
        if val:
            row.update({k: val.get(k) for k in ("mAP50", "mAP50-95", "precision", "recall")})
        if comp:
            q = comp["quantized"]["counts"]
            paper = next((t for t in comp["theoretical"] if t["budget"].startswith("paper")), None)
            row.update({"theoretical_ratio": paper and paper["ratio"], "ternary_param_pct": q["ternary_param_pct"],
                        "ternary_conv_pct": q["ternary_conv_pct"], "packed_bytes": comp["files"].get("packed_ternary_int8_rest"),
                        "baseline_pt_bytes": comp["files"].get("baseline_pt"),
                        "packed_round_trip_ok": (comp.get("packed") or {}).get("round_trip", {}).get("ok")})
        elif key == "fp":
            row.update({"theoretical_ratio": 1.0, "ternary_param_pct": 0.0, "ternary_conv_pct": 0.0})
        rows.append(row)
    fp_bytes = next((r.get("baseline_pt_bytes") for r in rows if r.get("baseline_pt_bytes")), None)
    if fp_bytes:
        rows[0]["pt_bytes"] = fp_bytes
    lat = _load(res / "latency.json")
    ratios = _latency_ratio(lat)
    final = next((r for r in reversed(rows) if r["step"] == "c2psa_ttq"), None)
    if final is not None and ratios:
        final["latency_ratio"] = ratios
    return {"rows": rows, "latency_ratios": ratios, "compare_bitlinear": _load(res / "compare_bitlinear.json"),
            "step_seconds": {p.name: int(p.read_text() or 0) for p in sorted((run / ".done").glob("*"))
                             if p.read_text().strip().isdigit()}}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(summary: dict, profile: str, size: str) -> str:
    lines = [f"# YOLO11-TQ pipeline report ({profile} profile, yolo11{size})", "",
             "| step | mAP50 | mAP50-95 | theoretical compression | packed size (MB) | ternary params | ternary convs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["rows"]:
        packed = r.get("packed_bytes") or r.get("pt_bytes")
        lines.append(f"| {r['name']} | {_fmt(r['mAP50'], '.3f')} | {_fmt(r['mAP50-95'], '.3f')} | "
                     f"{_fmt(r.get('theoretical_ratio'), '.2f')}x | {_fmt(packed and packed / 1e6, '.2f')}"
                     f"{' (.pt)' if r['step'] == 'fp' and packed else ''} | "
                     f"{_fmt(r.get('ternary_param_pct'), '.1f')}% | {_fmt(r.get('ternary_conv_pct'), '.1f')}% |")
    lines += ["", "Theoretical compression as in the original reports: 32 bits per FP parameter, 2 bits per ternary "
              "weight. Packed size: ternary weights as base-3 codes (1.6 bits), other weights INT8 per output channel, "
              f"BN/biases FP16 (compression_calculation.py --pack).", ""]
    if summary["latency_ratios"]:
        lines.append("Latency, final model (Stage 1-3 + BitLinear_TTQ) / FP baseline, median, same backend:")
        lines.append("")
        for t, v in summary["latency_ratios"].items():
            lines.append(f"- {t}: {v:.2f}x")
        lines.append("")
    if summary["step_seconds"]:
        total = sum(summary["step_seconds"].values())
        lines.append(f"Step times (s): " + ", ".join(f"{k} {v}" for k, v in summary["step_seconds"].items())
                     + f"; total {total} s.")
    lines += ["", "Plots: `map_vs_size.png` (mAP50-95 against packed size), "
              "`stages.png` (per-step bars)."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, run: Path) -> list[Path]:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r.get("mAP50-95") is not None]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        size = (r.get("packed_bytes") or r.get("pt_bytes") or 0) / 1e6
        if size:
            ax.scatter(size, r["mAP50-95"], s=50, zorder=3)
            ax.annotate(r["name"], (size, r["mAP50-95"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("model size on disk (MB; FP: .pt, ternary: packed file)")
    ax.set_ylabel("mAP50-95 (val)")
    ax.set_title("Accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run / "map_vs_size.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    names = [r["name"].replace(" + ", "\n+ ") for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["mAP50-95"] for r in rows], width=0.4, label="mAP50-95")
    ax1.set_ylabel("mAP50-95")
    ax2 = ax1.twinx()
    ax2.bar([i + 0.2 for i in x], [r.get("theoretical_ratio") or 0 for r in rows], width=0.4, color="tab:orange",
            label="theoretical compression")
    ax2.set_ylabel("theoretical compression (x)")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(names, fontsize=7)
    fig.legend(loc="upper right", fontsize=8)
    ax1.set_title("Per step")
    fig.tight_layout()
    out.append(run / "stages.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--profile", default="quick")
    p.add_argument("--size", default="n")
    a = p.parse_args()
    run = Path(a.run_dir)
    summary = collect(run)
    summary.update(profile=a.profile, model_size=a.size)
    write_json(summary, run / "summary.json")
    atomic_write_text(run / "summary.md", markdown(summary, a.profile, a.size))
    for path in plots(summary, run):
        print(f"plot: {path}")
    print((run / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
