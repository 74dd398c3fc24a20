"""The run.sh report: summary.md, summary.json and plots from the JSON files the pipeline's steps wrote
(`yolo-tq report RUN_DIR`, yolo_tq/commands/report.py).

Every figure comes from a file a step wrote; what a step did not measure is said, with the reason, not filled in.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from .deploy.backends import DEPLOY_REQS as DEPLOY_HINT
from .deploy.results import SCHEMA as LATENCY_SCHEMA
from .io import atomic_write_bytes, atomic_write_text, write_json

STEPS = [("fp", "FP baseline"), ("stage1", "Stage 1"), ("stage2", "Stage 1-2"), ("stage3", "Stage 1-3"),
         ("c2psa_ttq", "Stage 1-3 + BitLinear_TTQ"), ("c2psa_standard", "Stage 1-3 + standard BitLinear")]


def step_order() -> list[str]:
    """run.sh's steps in the order it runs them (the report lists step times in this order)."""
    trained = [key for key, _ in STEPS[1:]]
    return ["fetch_weights", *trained, "val_fp", *(f"{p}_{k}" for k in trained for p in ("val", "compression")),
            *(f"{p}_{k}" for k, _ in STEPS for p in ("deploy", "deploy_val")), "compare_bitlinear", "latency",
            "int8_reference"]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _triple(ab: dict | None, model: str) -> list[float] | None:
    """[paired median, lower, upper] of `model` in an interleaved pass record, or None."""
    if not ab or ab.get("status") != "ok" or model not in ab.get("paired_median_ratio", {}):
        return None
    return [ab["paired_median_ratio"][model], *ab["ratio_interval"][model]]


def latency_summary(lat: dict | None) -> dict:
    """What the report says about latency: per target the A/A figure and the A/B ratio (accepted or not, and why),
    every row that was not timed and every skipped target, each with its reason."""
    if lat is None:
        return {"measured": False, "reason": "the latency step has not run (no results/latency.json)"}
    if lat.get("schema") != LATENCY_SCHEMA:
        return {"measured": False, "reason": f"results/latency.json is {lat.get('schema')}, this report reads "
                                             f"{LATENCY_SCHEMA}: delete .done/latency and re-run run.sh"}
    inter = [{"target": i["target"], "status": i["status"], "reason": i["reason"],
              "aa": _triple(i.get("aa"), "baseline-copy"), "ab": _triple(i.get("ab"), "quantized"),
              "cycles": lat["options"]["num_runs"] // 2} for i in lat.get("interleaved", [])]
    return {"measured": True, "device": lat["options"].get("device"), "imgsz": lat["options"].get("imgsz"),
            "aa_tolerance": lat["options"].get("aa_tolerance"), "interleaved": inter,
            "not_timed": [{k: r[k] for k in ("model", "target", "status", "reason")}
                          for r in lat.get("rows", []) if r["status"] != "ok"],
            "skipped": [{"target": s["target"], "reason": s["reason"]} for s in lat.get("skipped", [])]}


def step_seconds(run: Path) -> dict[str, int]:
    """Seconds per finished step (.done markers), in pipeline order; steps run.sh does not list come after, in
    the order they finished."""
    done = sorted((p for p in (run / ".done").glob("*") if p.read_text().strip().isdigit()),
                  key=lambda p: p.stat().st_mtime_ns)
    rank = {name: i for i, name in enumerate(step_order())}
    done.sort(key=lambda p: rank.get(p.name, len(rank)))  # stable: the unlisted keep their finishing order
    return {p.name: int(p.read_text()) for p in done}


def _step_row(res: Path, key: str, label: str) -> dict:
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
    deploy, deploy_val = _load(res / f"deploy_{key}.json"), _load(res / f"deploy_val_{key}.json")
    if deploy:
        row.update({"deploy_bytes": deploy["bytes"], "deploy_ternary_layers": deploy["encoding"]["ternary"]["tensors"],
                    "fp_onnx_bytes": deploy["fp_onnx_bytes"]})
    if deploy_val:
        row["deploy_mAP50-95"] = deploy_val.get("mAP50-95")
    return row


def collect(run: Path) -> dict:
    res = run / "results"
    rows = [_step_row(res, key, label) for key, label in STEPS]
    fp_bytes = next((r.get("baseline_pt_bytes") for r in rows if r.get("baseline_pt_bytes")), None)
    if fp_bytes:
        rows[0]["pt_bytes"] = fp_bytes
    latency = latency_summary(_load(res / "latency.json"))
    accepted = {i["target"]: i["ab"][0] for i in latency.get("interleaved", []) if i["status"] == "ok"}
    reference = _load(res / "int8_reference.json") or {
        "status": "skipped", "reason": "the int8_reference step has not run (no results/int8_reference.json)"}
    return {"rows": rows, "latency": latency, "latency_ratios": accepted, "int8_reference": reference,
            "compare_bitlinear": _load(res / "compare_bitlinear.json"), "step_seconds": step_seconds(run)}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _interval(t: list[float] | None) -> str:
    return "-" if t is None else f"{t[0]:.3f}x [{t[1]:.3f}, {t[2]:.3f}]"


def latency_lines(lat: dict) -> list[str]:
    """The report's latency section (latency_summary's content, one line per target, refusal or skip)."""
    if not lat["measured"]:
        return [f"Latency: not measured: {lat['reason']}.", ""]
    tol = lat["aa_tolerance"]
    lines = [f"Latency ({lat['device']}, imgsz {lat['imgsz']}), final model (Stage 1-3 + BitLinear_TTQ) / FP "
             "baseline on the same target, timed in alternation in one process: paired median ratio over rotation "
             f"cycles [95% bootstrap interval]. It counts only where the A/A check (the baseline against a copy of "
             f"itself, timed the same way) reads 1.00 ± {tol:g}.", ""]
    for i in lat["interleaved"]:
        if i["status"] == "ok":
            lines.append(f"- {i['target']}: **{_interval(i['ab'])}**; A/A {_interval(i['aa'])}; "
                         f"{i['cycles']} cycles of 2 runs each")
        else:
            lines.append(f"- {i['target']}: {i['status']}: {i['reason']} (A/B read {_interval(i['ab'])}, "
                         "not counted)")
    if not lat["interleaved"]:
        lines.append("- no target timed both models (see below)")
    for r in lat["not_timed"]:
        lines.append(f"- {r['model']} {r['target']}: {r['status']}: {r['reason']}")
    by_reason = defaultdict(list)
    for s in lat["skipped"]:
        by_reason[s["reason"]].append(s["target"])
    lines += [f"- skipped {', '.join(targets)}: {reason}" for reason, targets in by_reason.items()]
    return lines + [""]


def reference_lines(ref: dict) -> list[str]:
    if ref.get("status") != "ok":
        return [f"No INT8 reference point: {ref.get('reason')}"
                + (f"; to measure it: {DEPLOY_HINT}, delete .done/int8_reference and re-run run.sh."
                   if ref.get("status") == "skipped" and "not installed" in str(ref.get("reason")) else "."), ""]
    fp = ref["fp_same_validation"]["mAP50-95"]
    return [f"Reference (measured): Ultralytics' OpenVINO INT8 export of the FP model, {ref['bytes'] / 1e6:.2f} MB "
            f"on disk, mAP50-95 {ref['mAP50-95']:.3f} ({ref['validation']}; the FP model validated the same way: "
            f"{fp:.3f}).", ""]


def markdown(summary: dict, profile: str, size: str) -> str:
    lines = [f"# YOLO11-TQ pipeline report ({profile} profile, yolo11{size})", "",
             "| step | mAP50 | mAP50-95 | theoretical compression | packed size (MB) | deployable ONNX (MB) | "
             "mAP50-95 from the ONNX | ternary params | ternary convs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["rows"]:
        packed, dep = r.get("packed_bytes") or r.get("pt_bytes"), r.get("deploy_bytes")
        lines.append(f"| {r['name']} | {_fmt(r['mAP50'], '.3f')} | {_fmt(r['mAP50-95'], '.3f')} | "
                     f"{_fmt(r.get('theoretical_ratio'), '.2f')}x | {_fmt(packed and packed / 1e6, '.2f')}"
                     f"{' (.pt)' if r['step'] == 'fp' and packed else ''} | {_fmt(dep and dep / 1e6, '.2f')} | "
                     f"{_fmt(r.get('deploy_mAP50-95'), '.3f')} | "
                     f"{_fmt(r.get('ternary_param_pct'), '.1f')}% | {_fmt(r.get('ternary_conv_pct'), '.1f')}% |")
    lines += ["", "Theoretical compression as in the original reports: 32 bits per FP parameter, 2 bits per ternary "
              "weight. Packed size: ternary weights as base-3 codes (1.6 bits), other weights INT8 per output channel, "
              "BN/biases FP16 (compression_calculation.py --pack). Deployable ONNX: the file onnxruntime and "
              "`ultralytics.YOLO(path)` run (export.py; ternary weights as 1.6-bit codes, the other conv weights INT8 "
              "per output channel; the FP row: every conv INT8), validated from that file by stock Ultralytics "
              "(onnxruntime, batch 1); the mAP50-95 column beside it is PyTorch's (validate.py, batch 16).", ""]
    lines += reference_lines(summary["int8_reference"]) + latency_lines(summary["latency"])
    if summary["step_seconds"]:
        total = sum(summary["step_seconds"].values())
        lines.append("Step times (s), in pipeline order: "
                     + ", ".join(f"{k} {v}" for k, v in summary["step_seconds"].items()) + f"; total {total} s.")
    star = " and Ultralytics' INT8 export as a measured reference" if summary["int8_reference"].get("status") == "ok" \
        else ""
    lines += ["", f"Plots: `map_vs_size.png` (mAP50-95 of each deployable ONNX against its size on disk{star}), "
              "`stages.png` (per-step bars)."]
    return "\n".join(lines) + "\n"


LABEL_OFFSETS = [(dx * k, dy * k) for k in (1, 2, 3, 4) for dx, dy in
                 ((8, 0), (-8, 0), (0, 9), (0, -9), (8, 10), (8, -10), (-8, 10), (-8, -10))]


def _label_fits(box, placed: list, markers: list, frame) -> bool:
    """A label's text fits: inside the axes frame, clear of the other points' markers and of the labels placed so
    far."""
    inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    return inside and not any(box.overlaps(b) for b in markers + placed)


def place_labels(fig, ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> list:
    """Label each point (x, y, text) at the first offset of LABEL_OFFSETS (beside it, above or below it, then
    further out, with a leader line) where its text stays inside the axes and clear of the labels placed so far (top
    to bottom) and of the other points' markers. Returns the annotations."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer, frame = fig.canvas.get_renderer(), ax.get_window_extent()
    centres = [ax.transData.transform((x, y)) for x, y, _ in points]
    markers = [Bbox.from_extents(cx - 6, cy - 6, cx + 6, cy + 6) for cx, cy in centres]
    placed, notes = [], []
    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        x, y, text = points[i]
        note = ax.annotate(text, (x, y), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=fontsize,
                           va="center", arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0,
                                                    "shrinkB": 4})
        for dx, dy in LABEL_OFFSETS + [LABEL_OFFSETS[0]]:  # the last: nothing fits, beside the point
            note.xyann = (dx, dy)
            note.set_ha("left" if dx > 0 else "right" if dx < 0 else "center")
            note.set_va("center" if dy == 0 else "bottom" if dy > 0 else "top")
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader line
            if _label_fits(box, placed, markers[:i] + markers[i + 1:], frame):
                break
        placed.append(box)
        notes.append(note)
    return notes


def save_figure(fig, path: Path) -> Path:
    """PNG through the one atomic writer; closes the figure."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def deployable_point(r: dict) -> tuple[float, float] | None:
    """(MB, mAP50-95) of a step's deployable ONNX, as validated from that file; None where not measured."""
    if r.get("deploy_bytes") and r.get("deploy_mAP50-95") is not None:
        return r["deploy_bytes"] / 1e6, r["deploy_mAP50-95"]
    return None


def plot_map_vs_size(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ref = summary["int8_reference"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = []
    for r in summary["rows"]:
        p = deployable_point(r)
        if p:
            ax.scatter(*p, s=50, zorder=3)
            points.append((*p, r["name"]))
    if ref.get("status") == "ok":
        ax.scatter(ref["bytes"] / 1e6, ref["mAP50-95"], marker="*", s=200, color="black", zorder=4)
        points.append((ref["bytes"] / 1e6, ref["mAP50-95"], "Ultralytics OpenVINO INT8 export (measured)"))
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("deployable file on disk (MB; ONNX from export.py, INT8 reference: OpenVINO folder)")
    ax.set_ylabel("mAP50-95 (val)")
    ax.set_title("Accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(fig, ax, points)
    return save_figure(fig, path)


def plot_stages(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r.get("mAP50-95") is not None]
    fig, ax1 = plt.subplots(figsize=(8, 4.8))
    x = range(len(rows))
    maps, ratios = [r["mAP50-95"] for r in rows], [r.get("theoretical_ratio") or 0 for r in rows]
    ax1.bar([i - 0.2 for i in x], maps, width=0.4, label="mAP50-95 (left axis)")
    ax1.set_ylabel("mAP50-95")
    ax2 = ax1.twinx()
    ax2.bar([i + 0.2 for i in x], ratios, width=0.4, color="tab:orange", label="theoretical compression (right axis)")
    ax2.set_ylabel("theoretical compression (x)")
    ax1.set_ylim(0, 1.35 * max(maps + [1e-3]))  # headroom: the legend sits inside the axes, above the bars
    ax2.set_ylim(0, 1.35 * max(ratios + [1.0]))
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([r["name"].replace(" + ", "\n+ ") for r in rows], fontsize=7)
    handles = [h for a in (ax1, ax2) for h in a.get_legend_handles_labels()[0]]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=2, fontsize=8)
    ax1.set_title("Per step")
    fig.tight_layout()
    return save_figure(fig, path)


def plots(summary: dict, run: Path) -> list[Path]:
    os.environ.setdefault("MPLBACKEND", "Agg")
    return [plot_map_vs_size(summary, run / "map_vs_size.png"), plot_stages(summary, run / "stages.png")]


def write_report(run: Path, profile: str, size: str) -> list[Path]:
    """summary.json, summary.md and the plots of the pipeline run folder `run`; returns the files written."""
    summary = collect(run)
    summary.update(profile=profile, model_size=size)
    write_json(summary, run / "summary.json")
    atomic_write_text(run / "summary.md", markdown(summary, profile, size))
    return [run / "summary.json", run / "summary.md", *plots(summary, run)]
