"""The original YOLO11-TQ README's commands, typed as printed (plus flags for the tiny generated data, one epoch,
imgsz 64, CPU): the three train.py stages, train_c2psa.py with the path the original run.sh names, validate.py (also
its --fp32 comparison mode with --per-class), compression_calculation.py, test.py, the positional
compare_bitlinear.py and latency_benchmark.py. Each runs in a fresh working folder, as a user's checkout would."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_here

ORIGINAL_C2PSA_START = "ttq_checkpoints/yolo11n/stage1_progressive_final/best.pt"  # the original run.sh's --model
VAL = ("--imgsz", "64", "--batch", "4", "--device", "cpu")


def tiny_train_flags(weights: Path, data: Path) -> tuple:
    return ("--weights", weights, "--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0",
            "--device", "cpu", "--set", "train.plots=false", "--set", "train.val=false",
            "--set", "train.ultralytics.nbs=4")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    """In a fresh folder: the original run.sh's four training commands (three stages, then C2PSA from the original
    stage-3 path), each with the tiny flags; the config paths resolve from the package's configs/."""
    work = tmp_path_factory.mktemp("original_commands")
    flags = tiny_train_flags(tiny_fp_checkpoint, tiny_data)
    stages = [run_here("train.py", "--config", "configs/stage1_progressive.yaml", "--stage", n, *flags, cwd=work)
              for n in (1, 2, 3)]
    c2psa = run_here("train_c2psa.py", "--config", "configs/stage2_c2psa.yaml", "--model", ORIGINAL_C2PSA_START,
                     *flags, cwd=work)
    out = work / "checkpoints" / "yolo11n"
    return {"work": work, "stages": stages, "c2psa": c2psa, "out": out,
            "ternary": {s: out / s / "ternary.pt" for s in ("stage1", "stage2", "stage3", "c2psa_bitlinear_ttq")}}


def ternary_convs(path: Path, cwd: Path) -> int:
    """test.py CKPT, as the original README types it: the count of ternary convs it reports."""
    r = run_here("test.py", path, cwd=cwd)
    assert r.returncode == 0, r.stderr[-1500:]
    return int(re.search(r"ternary convs: (\d+) / \d+", r.stdout).group(1))


def test_train_stages_as_printed(chain):
    for n, r in enumerate(chain["stages"], start=1):
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"stage {n}: training checkpoint checkpoints/yolo11n/stage{n}/weights/best.pt" in r.stdout
        assert (chain["out"] / f"stage{n}" / "weights" / "best.pt").is_file()
    counts = [ternary_convs(chain["ternary"][f"stage{n}"], chain["work"]) for n in (1, 2, 3)]
    assert 0 < counts[0] < counts[1] < counts[2]  # cumulative stages


def test_train_c2psa_from_original_run_sh_path(chain):
    """The original stage-3 folder (stage1_progressive_final) resolves to our stage 3 with one note line; the C2PSA
    model then holds the stage 1-3 ternary convs and its BitLinear layers (more than stage 3 alone)."""
    r = chain["c2psa"]
    assert r.returncode == 0, r.stderr[-2000:]
    notes = [line for line in r.stdout.splitlines() if line.startswith("note: original path")]
    assert notes == [f"note: original path {ORIGINAL_C2PSA_START} -> checkpoints/yolo11n/stage3/weights/best.pt "
                     f"(stage 3 of configs/stage1_progressive.yaml)"]
    assert not (chain["work"] / "ttq_checkpoints").exists()
    work, t = chain["work"], chain["ternary"]
    assert ternary_convs(t["c2psa_bitlinear_ttq"], work) > ternary_convs(t["stage3"], work)


def test_train_c2psa_original_path_without_our_output(tmp_path, tiny_fp_checkpoint, tiny_data):
    r = run_here("train_c2psa.py", "--config", "configs/stage2_c2psa.yaml", "--model", ORIGINAL_C2PSA_START,
                 *tiny_train_flags(tiny_fp_checkpoint, tiny_data), cwd=tmp_path)
    assert_one_line_error(r, ORIGINAL_C2PSA_START, "checkpoints/yolo11n/stage3/weights/best.pt",
                          "python train.py --config configs/stage1_progressive.yaml --stage 3")
    assert not (tmp_path / "checkpoints").exists()


def test_original_stage_folders_map_to_our_stages(tmp_path):
    from yolo_tq.commands.args import original_stage_output

    for folder, n in (("stage1_progressive", 1), ("stage1_progressive_middle", 2), ("stage1_progressive_final", 3)):
        got = original_stage_output(f"ttq_checkpoints/yolo11s/{folder}/best.pt", tmp_path / "ck")
        assert got == (n, tmp_path / "ck" / "yolo11s" / f"stage{n}" / "weights" / "best.pt")
    assert original_stage_output("ttq_checkpoints/yolo11n/stage1_progressive_final/last.pt", "ck")[1].name == "last.pt"
    for other in ("yolo11n.pt", "ttq_checkpoints/yolo11n/stage3/best.pt", "x/yolo11q/stage1_progressive/best.pt",
                  "ttq_checkpoints/yolo11n/stage1_progressive/epoch_3.pt"):
        assert original_stage_output(other, "ck") is None


def test_validate_as_printed_reports_map75(chain, tiny_data):
    r = run_here("validate.py", chain["ternary"]["stage1"], "--data", tiny_data, *VAL, "--json", "v.json",
                 cwd=chain["work"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^mAP75\s+\d\.\d{4}$", r.stdout, re.M)
    m = json.loads((chain["work"] / "v.json").read_text())
    assert 0 <= m["mAP75"] <= m["mAP50"] <= 1 and "per_class" not in m


def test_validate_fp32_side_by_side_per_class(chain, tiny_fp_checkpoint, tiny_data):
    """--fp32 validates both with the same settings: each side equals validate.py of that model alone, the
    difference is checkpoint − baseline, and --per-class lists the val split's labelled classes for both."""
    work, ckpt = chain["work"], chain["ternary"]["stage1"]
    r = run_here("validate.py", ckpt, "--fp32", tiny_fp_checkpoint, "--data", tiny_data, *VAL, "--per-class",
                 "--json", "pair.json", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^metric\s+baseline\s+checkpoint\s+difference", r.stdout, re.M)
    assert all(re.search(rf"^{k}\s", r.stdout, re.M) for k in ("mAP50", "mAP75", "mAP50-95", "precision", "recall"))
    pair = json.loads((work / "pair.json").read_text())
    assert pair["baseline"]["checkpoint"] == str(tiny_fp_checkpoint) and pair["checkpoint"]["checkpoint"] == str(ckpt)
    for side, path in (("baseline", tiny_fp_checkpoint), ("checkpoint", ckpt)):
        alone = run_here("validate.py", path, "--data", tiny_data, *VAL, "--json", f"{side}.json", cwd=work)
        assert alone.returncode == 0, alone.stderr[-1500:]
        single = json.loads((work / f"{side}.json").read_text())
        assert all(pair[side][k] == pytest.approx(single[k]) for k in pair["difference"])
    assert all(d == pytest.approx(pair["checkpoint"][k] - pair["baseline"][k]) for k, d in pair["difference"].items())
    labelled = sorted({int(line.split()[0]) for f in (tiny_data.parent / "labels" / "val").glob("*.txt")
                       for line in f.read_text().splitlines()})
    assert [row["class"] for row in pair["per_class"]] == labelled
    assert [row["class"] for row in pair["baseline"]["per_class"]] == labelled
    assert "per class" in r.stdout and "base mAP50-95" in r.stdout


def test_validate_fp32_missing_baseline_before_any_validation(tmp_path, tiny_fp_checkpoint, tiny_data):
    r = run_here("validate.py", tiny_fp_checkpoint, "--fp32", tmp_path / "none.pt", "--data", tiny_data, *VAL,
                 "--json", "pair.json", cwd=tmp_path)
    assert_one_line_error(r, "checkpoint not found", "none.pt")
    assert "mAP50" not in r.stdout and not (tmp_path / "pair.json").exists()


def fake_metrics():
    """Ultralytics' own DetMetrics from hand-made matches: class 0 found at every IoU threshold, class 1 found once
    (up to IoU 0.7) and missed once, class 2 predicted but never labelled."""
    from ultralytics.utils.metrics import DetMetrics

    m = DetMetrics(names={0: "cat", 1: "dog", 2: "cow"})
    tp = np.zeros((5, 10), bool)
    tp[0:2] = True  # class 0: both predictions match at every threshold
    tp[2, :5] = True  # class 1: one match up to IoU 0.7, one false positive
    images = (("a.jpg", slice(0, 2), [0, 0]), ("b.jpg", slice(2, 5), [1, 1]))  # as the validator adds them
    conf, pred_cls = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([0, 0, 1, 1, 2])
    for name, preds, target in images:
        target = np.array(target)
        m.update_stats({"tp": tp[preds], "conf": conf[preds], "pred_cls": pred_cls[preds], "target_cls": target,
                        "target_img": np.unique(target), "im_name": name})
    m.process()
    return m


def test_class_rows_agree_with_ultralytics_summary():
    from yolo_tq.eval.validate import class_rows, pair_class_rows

    m = fake_metrics()
    rows = class_rows(m)
    summary = {s["Class"]: s for s in m.summary(decimals=6)}
    assert [(r["class"], r["name"], r["instances"]) for r in rows] == [(0, "cat", 2), (1, "dog", 2)]
    for r in rows:
        assert r["mAP50"] == pytest.approx(summary[r["name"]]["mAP50"], abs=1e-6)
        assert r["mAP50-95"] == pytest.approx(summary[r["name"]]["mAP50-95"], abs=1e-6)
    assert rows[0]["mAP50-95"] > 0.9 and 0 < rows[1]["mAP50-95"] < rows[1]["mAP50"] < rows[0]["mAP50"]
    worse = [{**r, "mAP50": r["mAP50"] / 2, "mAP50-95": 0.0} for r in rows]
    paired = pair_class_rows(rows, worse)
    assert [p["baseline mAP50"] for p in paired] == [r["mAP50"] for r in rows]
    assert all(p["difference mAP50-95"] == -r["mAP50-95"] for p, r in zip(paired, rows))
    assert all(p["difference mAP50"] == pytest.approx(-r["mAP50"] / 2) for p, r in zip(paired, rows))


def test_compression_calculation_as_printed(chain, tiny_fp_checkpoint):
    r = run_here("compression_calculation.py", "--baseline", tiny_fp_checkpoint, "--quantized",
                 chain["ternary"]["c2psa_bitlinear_ttq"], "--json", "size.json", cwd=chain["work"])
    assert r.returncode == 0, r.stderr[-2000:]
    paper = json.loads((chain["work"] / "size.json").read_text())["theoretical"][0]
    assert paper["budget"].startswith("paper") and 2.0 < paper["ratio"] < 2.3  # the original reports 2.16x
    assert f"{paper['ratio']:.2f}x" in r.stdout


@pytest.fixture(scope="module")
def standard_checkpoint(chain, tiny_fp_checkpoint):
    """A standard-BitLinear C2PSA model (post-training, from configs/stage2_c2psa_standard.yaml)."""
    from yolo_tq.config import load_config
    from yolo_tq.train.stages import post_training_ternary

    cfg = load_config("configs/stage2_c2psa_standard.yaml")
    return post_training_ternary(cfg, [0], str(tiny_fp_checkpoint), chain["work"] / "standard_ptq.pt")


def test_compare_bitlinear_positional(chain, tiny_fp_checkpoint, tiny_data, standard_checkpoint):
    """The original's form, TTQ STANDARD with the baseline defaulting to yolo11n.pt (here a local copy of the tiny
    FP model): each file lands in its own row."""
    work, ttq = chain["work"], chain["out"] / "c2psa_bitlinear_ttq" / "weights" / "best.pt"
    shutil.copy(tiny_fp_checkpoint, work / "yolo11n.pt")
    r = run_here("compare_bitlinear.py", ttq, standard_checkpoint, "--data", tiny_data, *VAL,
                 "--json", "cmp.json", "--csv", "cmp.csv", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["model"]: row for row in json.loads((work / "cmp.json").read_text())["rows"]}
    assert rows["baseline"]["checkpoint"] == "yolo11n.pt" and rows["baseline"]["bitlinear_layers"] == 0
    assert rows["BitLinear_TTQ"]["checkpoint"] == str(ttq)
    assert rows["standard BitLinear"]["checkpoint"] == str(standard_checkpoint)
    assert rows["BitLinear_TTQ"]["ternary_convs"] > rows["standard BitLinear"]["ternary_convs"] > 0  # stages 1-3 too


@pytest.mark.parametrize("args, needles", [
    (("{ttq}", "{std}", "--ttq", "{ttq}"), ("TTQ given twice", "--ttq")),
    (("{ttq}", "{std}", "{fp}", "--baseline", "{fp}"), ("BASELINE given twice", "--baseline")),
    (("--ttq", "{ttq}"), ("missing the STANDARD checkpoint", "--standard")),
])
def test_compare_bitlinear_positional_errors(args, needles, tmp_path, tiny_fp_checkpoint, tiny_data):
    paths = {"ttq": tiny_fp_checkpoint, "std": tiny_fp_checkpoint, "fp": tiny_fp_checkpoint}
    r = run_here("compare_bitlinear.py", *[a.format(**paths) for a in args], "--data", tiny_data,
                 "--json", "c.json", cwd=tmp_path)
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "c.json").exists()


def test_latency_benchmark_as_printed(chain, tiny_fp_checkpoint, tiny_data):
    """The original's flags (--export-fp16 --export-int8 --num-runs) on what every test machine has: ONNX Runtime
    on the CPU (--device cpu, so that the test means the same with or without a GPU). Without --data the INT8
    targets calibrate on coco128.yaml, as Ultralytics' INT8 export does: here a local coco128.yaml stands where
    Ultralytics looks first (the working folder), holding the tiny dataset."""
    (chain["work"] / "coco128.yaml").write_text(tiny_data.read_text())  # its path: is absolute
    r = run_here("latency_benchmark.py", "--baseline", tiny_fp_checkpoint, "--quantized",
                 chain["ternary"]["c2psa_bitlinear_ttq"], "--export-fp16", "--export-int8", "--num-runs", "3",
                 "--backends", "onnxruntime", "--device", "cpu", "--imgsz", "64", "--warmup", "1", "--no-interleave",
                 "--json", "lat.json", cwd=chain["work"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: INT8 calibration on coco128.yaml" in r.stdout
    rows = json.loads((chain["work"] / "lat.json").read_text())["rows"]
    timed = {(row["model"], row["target"]) for row in rows if row["status"] == "ok"}
    assert {("baseline", "onnxruntime-cpu"), ("quantized", "onnxruntime-cpu")} <= timed


def test_original_result_paths_read_ours_or_name_the_command(tmp_path, tiny_fp_checkpoint):
    """saved_models/yolo11<size>/<name>.pt (the original's result files, run.sh's links) resolve to our stage output
    with a note where run.sh has not linked them; a missing one is one line naming what writes it."""
    import shutil

    ours = tmp_path / "checkpoints" / "yolo11n" / "stage1" / "ternary.pt"
    ours.parent.mkdir(parents=True)
    shutil.copy(tiny_fp_checkpoint, ours)
    r = run_here("test.py", "saved_models/yolo11n/stage1.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: original path saved_models/yolo11n/stage1.pt -> checkpoints/yolo11n/stage1/ternary.pt" in r.stdout
    r = run_here("validate.py", "saved_models/yolo11n/stage1-3+bitlinear_ttq.pt", cwd=tmp_path)
    assert_one_line_error(r, "saved_models/yolo11n/stage1-3+bitlinear_ttq.pt not found",
                          "checkpoints/yolo11n/c2psa_bitlinear_ttq/ternary.pt", "bash run.sh")
    r = run_here("test.py", "ttq_checkpoints/yolo11n/stage1_progressive/best.pt", cwd=tmp_path)
    assert_one_line_error(r, "checkpoints/yolo11n/stage1/weights/best.pt")
