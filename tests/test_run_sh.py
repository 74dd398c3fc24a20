"""run.sh end to end on a generated tiny dataset (quick profile, one epoch per step): every report artefact,
continuation without redoing finished steps, and a failing step that stops the pipeline."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
from yolo_tq.report import STEPS as PIPELINE_STEPS
from yolo_tq.report import step_order

STEPS = [key for key, _ in PIPELINE_STEPS[1:]]  # the FP row is not a step of its own


def run_pipeline(run_dir: Path, weights: Path, data: Path):
    env = {**os.environ, "WEIGHTS": str(weights), "DATA": str(data), "RUN_DIR": str(run_dir), "EPOCHS": "1",
           "C2PSA_EPOCHS": "1", "RECONSTRUCT_STEPS": "2", "IMGSZ": "64", "BATCH": "4", "LATENCY_RUNS": "3",
           "BACKENDS": "torch", "YOLO_OFFLINE": "1",
           "DEVICE": "cpu",  # the latency step's default is the GPU where there is one
           "SAVED_MODELS": str(run_dir / "saved_models")}
    return subprocess.run(["bash", str(REPO / "run.sh"), "quick", "n"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    first = run_pipeline(run_dir, tiny_fp_checkpoint, tiny_data)
    return run_dir, first


def test_pipeline_writes_every_artefact(pipeline):
    run_dir, first = pipeline
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-3000:])
    for name in ("summary.md", "summary.json", "map_vs_size.png", "stages.png"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    res = run_dir / "results"
    for s in STEPS:
        val = json.loads((res / f"val_{s}.json").read_text())
        assert 0 <= val["mAP50-95"] <= val["mAP50"] <= 1 and val["imgsz"] == 64
        comp = json.loads((res / f"compression_{s}.json").read_text())
        packed = res / f"{s}.tq.safetensors"
        assert comp["packed"]["bytes"] == packed.stat().st_size and comp["packed"]["round_trip"]["ok"]
        assert comp["quantized"]["counts"]["ternary_params"] > 0
        assert packed.read_bytes()[8:9] == b"{"  # a safetensors header (JSON) after its 8-byte length
    for s in ["fp", *STEPS]:  # every model's deployable ONNX, validated from that file
        dep = json.loads((res / f"deploy_{s}.json").read_text())
        assert dep["bytes"] == (res / f"{s}.onnx").stat().st_size < 0.4 * dep["fp_onnx_bytes"]
        assert (dep["encoding"]["ternary"]["tensors"] > 0) == (s != "fp")
        assert json.loads((res / f"deploy_val_{s}.json").read_text())["checkpoint"].endswith(f"{s}.onnx")
    from yolo_tq.io import load_model

    for name in ("stage1", "stage1-2", "stage1-3", "stage1-3+bitlinear_ttq", "stage1-3+bitlinear_standard"):
        link = run_dir / "saved_models" / "yolo11n" / f"{name}.pt"  # the original code's result names
        assert link.is_symlink() and link.resolve().name == "ternary.pt" and load_model(link)[0] is not None
    compare = json.loads((res / "compare_bitlinear.json").read_text())
    assert [r["model"] for r in compare["rows"]] == ["baseline", "BitLinear_TTQ", "standard BitLinear"]
    latency = json.loads((res / "latency.json").read_text())
    assert latency["rows"] and {r["target"] for r in latency["rows"]} >= {"torch-cpu"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["step"] for r in summary["rows"]] == ["fp", *STEPS]
    assert all(r["deploy_bytes"] and r["deploy_mAP50-95"] is not None for r in summary["rows"])
    table = [line for line in (run_dir / "summary.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 1 + 1 + len(STEPS)  # header, FP row, one row per step
    ratios = [r["theoretical_ratio"] for r in summary["rows"]]
    assert ratios == sorted(ratios) and ratios[0] == 1.0 and ratios[3] > 1.9
    md = (run_dir / "summary.md").read_text()
    assert "- torch-cpu: " in md and "A/A" in md  # the interleaved ratio, accepted or refused, with the A/A figure
    assert "- skipped onnxruntime-cpu, " in md and "not in --backends" in md  # every skipped target, with why
    reference = json.loads((res / "int8_reference.json").read_text())
    if importlib.util.find_spec("openvino") is None:
        assert reference["status"] == "skipped" and "No INT8 reference point: OpenVINO is not installed" in md
    stage3 = next(line for line in first.stdout.splitlines() if line.startswith("== stage3: "))
    assert "--set distill.reconstruct_steps=2" in stage3  # RECONSTRUCT_STEPS reaches the training command
    times = md.split("Step times (s), in pipeline order: ")[1].split(";")[0]
    names = [t.split()[0] for t in times.split(", ")]
    assert names == [n for n in step_order() if n in names] and len(names) == len(step_order())


def test_second_call_redoes_nothing(pipeline, tiny_fp_checkpoint, tiny_data):
    run_dir, first = pipeline
    assert first.returncode == 0
    ckpt = run_dir / "checkpoints" / "yolo11n" / "stage1" / "weights" / "best.pt"
    mtime = ckpt.stat().st_mtime
    again = run_pipeline(run_dir, tiny_fp_checkpoint, tiny_data)
    assert again.returncode == 0, again.stderr[-2000:]
    for s in ["fetch_weights", *STEPS, "latency", "compare_bitlinear", "int8_reference"]:
        assert f"== {s}: done earlier, skipped" in again.stdout
    assert ckpt.stat().st_mtime == mtime


def test_failing_step_stops_pipeline(tmp_path, tiny_fp_checkpoint):
    run_dir = tmp_path / "run"
    r = run_pipeline(run_dir, tiny_fp_checkpoint, tmp_path / "missing" / "data.yaml")
    assert r.returncode != 0
    assert "step 'stage1' failed" in r.stderr
    assert (run_dir / ".done" / "fetch_weights").is_file()
    assert not (run_dir / ".done" / "stage1").exists() and not (run_dir / ".done" / "stage2").exists()
    assert not (run_dir / "summary.md").exists()


# ------------------------------------------------------------------------------ the report, from written results
def _latency_record():
    """A latency.json as the latency step writes it (the benchmark's own records): torch-cpu timed and accepted,
    openvino-fp32 timed but refused by its A/A check, the BitLinear model refused by onnxruntime-cpu, CUDA skipped."""
    import numpy as np

    from yolo_tq.deploy.measure import latency_stats
    from yolo_tq.deploy.results import (SCHEMA, ABResult, BenchResult, Environment, Interleaved, Memory, Skip,
                                        TargetRow)
    from yolo_tq.eval.agreement import compare_outputs

    ref = np.zeros((1, 6, 4), np.float32)
    agrees, disagrees = (compare_outputs([ref], [ref + d], "fp32") for d in (0.0, 1.45))

    def row(model, tgt, status="ok", reason=""):
        ok = status == "ok"
        return TargetRow(model=model, target=tgt, family=tgt.split("-")[0], device="cpu", precision="fp32",
                         status=status, reason=reason, clock="perf_counter" if ok else "",
                         agreement=agrees if ok else disagrees, latency=latency_stats([0.02, 0.021]) if ok else None,
                         memory=Memory(peak_rss_mb=500.0))

    def ab(kind, tgt, ratio, other):
        lat = latency_stats([0.02, 0.021])
        return ABResult(tgt, "ok", clock="perf_counter", kind=kind, stats={"baseline": lat, other: lat},
                        paired_median_ratio={"baseline": 1.0, other: ratio},
                        ratio_interval={"baseline": [1.0, 1.0], other: [ratio - 0.011, ratio + 0.012]})

    def passes(tgt, aa, abr):
        return dict(aa=ab("A/A", tgt, aa, "baseline-copy"), ab=ab("A/B", tgt, abr, "quantized"))

    refusal = "disagrees with PyTorch (max|Δbox| 1.45 px); criterion fp32"
    rows = [row("baseline", "torch-cpu"), row("quantized", "torch-cpu"), row("baseline", "onnxruntime-cpu"),
            row("quantized", "onnxruntime-cpu", "refused", refusal), row("baseline", "openvino-fp32"),
            row("quantized", "openvino-fp32")]
    inter = [Interleaved("torch-cpu", "ok", **passes("torch-cpu", 1.004, 0.987)),
             Interleaved("openvino-fp32", "refused", "A/A check read 1.061 [1.050, 1.073], outside 1.00 ± 0.03",
                         **passes("openvino-fp32", 1.061, 0.9))]
    skipped = [Skip(t, "a CUDA target (run with --device 0 on a machine with an NVIDIA GPU)")
               for t in ("torch-cuda", "tensorrt-fp16")]
    env = Environment("3.11", "x86_64", 2, {}, {}, [0.0, 0.0, 0.0])
    r = BenchResult(created="now", options={"device": "cpu", "imgsz": 320, "aa_tolerance": 0.03, "num_runs": 30},
                    environment=env,
                    models={}, skipped=skipped, rows=rows, interleaved=inter, comparisons=[], workdir="w")
    assert asdict(r)["schema"] == SCHEMA
    return asdict(r)


def write_report_inputs(run: Path, reference: dict | None) -> None:
    """The results a finished quick run leaves (figures of a real CPU run; the two BitLinear models at the same
    packed size with close mAPs, whose labels overlapped), .done markers finishing in pipeline order."""
    from yolo_tq.io import write_json

    res = run / "results"
    maps = {"fp": 0.336, "stage1": 0.164, "stage2": 0.126, "stage3": 0.104, "c2psa_ttq": 0.057,
            "c2psa_standard": 0.062}
    packed = {"stage1": 2.15e6, "stage2": 1.76e6, "stage3": 1.57e6, "c2psa_ttq": 1.48e6, "c2psa_standard": 1.48e6}
    ratio = {"stage1": 1.30, "stage2": 1.68, "stage3": 1.96, "c2psa_ttq": 2.13, "c2psa_standard": 2.13}
    deploy = {"fp": 2.76e6, "stage1": 2.27e6, "stage2": 1.89e6, "stage3": 1.70e6, "c2psa_ttq": 1.61e6,
              "c2psa_standard": 1.61e6}
    for key, m in maps.items():
        write_json({"mAP50": m * 1.4, "mAP50-95": m, "precision": 0.5, "recall": 0.4}, res / f"val_{key}.json")
        write_json({"bytes": deploy[key], "fp_onnx_bytes": 10.7e6, "encoding": {"ternary": {"tensors": 34}}},
                   res / f"deploy_{key}.json")
        write_json({"mAP50-95": m - 0.002}, res / f"deploy_val_{key}.json")
        if key != "fp":
            write_json({"quantized": {"counts": {"ternary_param_pct": 40.0, "ternary_conv_pct": 30.0}},
                        "theoretical": [{"budget": "paper (2/32 bits)", "ratio": ratio[key]}],
                        "files": {"packed_ternary_int8_rest": packed[key], "baseline_pt": 5.51e6},
                        "packed": {"round_trip": {"ok": True}}}, res / f"compression_{key}.json")
    write_json(_latency_record(), res / "latency.json")
    if reference is not None:
        write_json(reference, res / "int8_reference.json")
    (run / ".done").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(step_order()):
        marker = run / ".done" / name
        marker.write_text(str(100 + i))
        os.utime(marker, ns=(10**18 - i, 10**18 - i))  # finishing times in reverse: the order must not come from them


def _report(run: Path) -> tuple[str, dict]:
    p = subprocess.run([sys.executable, "-m", "yolo_tq", "report", str(run)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return (run / "summary.md").read_text(), json.loads((run / "summary.json").read_text())


MEASURED_INT8 = {"status": "ok", "format": "openvino-int8", "bytes": 3_212_345, "mAP50-95": 0.318, "mAP50": 0.45,
                 "precision": 0.6, "recall": 0.4, "validation": "batch 1 and rect=False",
                 "fp_same_validation": {"mAP50-95": 0.331, "mAP50": 0.46, "precision": 0.6, "recall": 0.4}}


def test_report_latency_reference_and_step_order(tmp_path):
    run = tmp_path / "run"
    write_report_inputs(run, MEASURED_INT8)
    md, summary = _report(run)
    assert "- torch-cpu: **0.987x [0.976, 0.999]**; A/A 1.004x [0.993, 1.016]; 15 cycles of 2 runs each" in md
    assert "- openvino-fp32: refused: A/A check read 1.061" in md and "(A/B read 0.900x" in md
    assert "- quantized onnxruntime-cpu: refused: disagrees with PyTorch (max|Δbox| 1.45 px)" in md
    assert "- skipped torch-cuda, tensorrt-fp16: a CUDA target" in md
    assert summary["latency_ratios"] == {"torch-cpu": 0.987}
    assert "3.21 MB on disk, mAP50-95 0.318" in md and "validated the same way: 0.331" in md
    times = md.split("Step times (s), in pipeline order: ")[1].split(";")[0]
    assert [t.split()[0] for t in times.split(", ")] == step_order()
    assert list(summary["step_seconds"]) == step_order()
    assert "2.78" not in md  # no constant reference figure is left


def test_report_without_deploy_extras_says_why(tmp_path):
    run = tmp_path / "run"
    write_report_inputs(run, {"status": "skipped", "reason": 'OpenVINO is not installed (pip install -e ".[deploy]", '
                                                             'or pip install openvino)'})
    md, summary = _report(run)
    assert 'No INT8 reference point: OpenVINO is not installed' in md and "delete .done/int8_reference" in md
    assert "measured reference" not in md and summary["int8_reference"]["status"] == "skipped"
    (run / "results" / "int8_reference.json").unlink()
    (run / "results" / "latency.json").unlink()
    md, _ = _report(run)
    assert "No INT8 reference point: the int8_reference step has not run" in md
    assert "Latency: not measured: the latency step has not run" in md


def test_plot_labels_do_not_overlap_and_legend_stays_inside(tmp_path, monkeypatch):
    """The plots as the report draws them: in map_vs_size.png no two labels overlap (the two BitLinear models sit
    at the same size, 0.005 mAP apart) and none leaves the figure; in stages.png the legend lies inside the axes."""
    from matplotlib.text import Text

    import yolo_tq.report as pipeline

    run = tmp_path / "run"
    write_report_inputs(run, MEASURED_INT8)
    seen, real_save = {}, pipeline.save_figure

    def spy(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        texts = [Text.get_window_extent(t) for t in ax.texts]  # the label text, without its leader line
        seen[path.name] = {"labels": texts, "figure": fig.bbox,
                           "legend": ax.get_legend() and ax.get_legend().get_window_extent(),
                           "axes": ax.get_window_extent()}
        return real_save(fig, path)

    monkeypatch.setattr(pipeline, "save_figure", spy)
    for path in pipeline.plots(pipeline.collect(run), run):
        assert path.stat().st_size > 0
    boxes, frame = seen["map_vs_size.png"]["labels"], seen["map_vs_size.png"]["figure"]
    assert len(boxes) == 7  # six steps and the measured INT8 reference
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    leg, axes = seen["stages.png"]["legend"], seen["stages.png"]["axes"]
    assert axes.x0 <= leg.x0 and leg.x1 <= axes.x1 and axes.y0 <= leg.y0 and leg.y1 <= axes.y1


def test_full_profile_passes_imgsz_and_batch_to_training(tmp_path):
    """`IMGSZ=64 BATCH=4 EPOCHS=1 bash run.sh full x` trains at 64 with batch 4: the commands run.sh builds, read
    with a stand-in `python` that records its arguments and does nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n[ "$1" = "-m" ] && [ "$3" = "fetch" ] && echo "$4"\nexit 0\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), RUN_DIR=str(tmp_path / "run"),
               IMGSZ="64", BATCH="4", EPOCHS="1", WEIGHTS="w.pt", DATA="d.yaml")
    p = subprocess.run(["bash", str(REPO / "run.sh"), "full", "x"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = calls.read_text().splitlines()
    train = [line for line in lines if line.startswith(("train.py", "train_c2psa"))]
    assert len(train) == 5
    for line in train:
        args = line.split()
        assert args[args.index("--imgsz") + 1] == "64" and args[args.index("--batch") + 1] == "4", line
        assert args[args.index("--epochs") + 1] == "1" and args[args.index("--model-size") + 1] == "x", line
    unset = subprocess.run(["bash", str(REPO / "run.sh"), "full", "x"], capture_output=True, text=True, timeout=120,
                           env={**env, "RUN_DIR": str(tmp_path / "run2"), "IMGSZ": "", "BATCH": ""})
    assert unset.returncode == 0
    stage1 = next(line for line in calls.read_text().splitlines()[len(lines):] if line.startswith("train.py"))
    assert "--imgsz" not in stage1 and "--batch" not in stage1  # the configs' own values
