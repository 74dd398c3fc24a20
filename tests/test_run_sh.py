"""run.sh end to end on a generated tiny dataset (quick profile, one epoch per step): every report artefact,
continuation without redoing finished steps, and a failing step that stops the pipeline."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
from yolo_tq.pipeline import STEPS as PIPELINE_STEPS

STEPS = [key for key, _ in PIPELINE_STEPS[1:]]  # the FP row is not a step of its own


def run_pipeline(run_dir: Path, weights: Path, data: Path):
    env = {**os.environ, "WEIGHTS": str(weights), "DATA": str(data), "RUN_DIR": str(run_dir), "EPOCHS": "1",
           "IMGSZ": "64", "BATCH": "4", "LATENCY_RUNS": "3", "BACKENDS": "torch", "YOLO_OFFLINE": "1"}
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
    compare = json.loads((res / "compare_bitlinear.json").read_text())
    assert [r["model"] for r in compare["rows"]] == ["baseline", "BitLinear_TTQ", "standard BitLinear"]
    latency = json.loads((res / "latency.json").read_text())
    assert latency["rows"] and {r["target"] for r in latency["rows"]} >= {"torch-cpu"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["step"] for r in summary["rows"]] == ["fp", *STEPS]
    table = [line for line in (run_dir / "summary.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 1 + 1 + len(STEPS)  # header, FP row, one row per step
    ratios = [r["theoretical_ratio"] for r in summary["rows"]]
    assert ratios == sorted(ratios) and ratios[0] == 1.0 and ratios[3] > 1.9


def test_second_call_redoes_nothing(pipeline, tiny_fp_checkpoint, tiny_data):
    run_dir, first = pipeline
    assert first.returncode == 0
    ckpt = run_dir / "checkpoints" / "yolo11n" / "stage1" / "weights" / "best.pt"
    mtime = ckpt.stat().st_mtime
    again = run_pipeline(run_dir, tiny_fp_checkpoint, tiny_data)
    assert again.returncode == 0, again.stderr[-2000:]
    for s in ["fetch_weights", *STEPS, "latency", "compare_bitlinear"]:
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
