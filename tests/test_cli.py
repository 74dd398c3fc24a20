"""Bad input gets one clear line and a non-zero exit (no traceback); every root script answers --help."""

import subprocess

import pytest
from conftest import REPO, assert_one_line_error, run

SCRIPTS = ["train.py", "validate.py", "test.py", "train_c2psa.py", "train_c2psa_standard.py",
           "compression_calculation.py", "compare_bitlinear.py", "latency_benchmark.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = run(REPO / script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_root_scripts_are_shims(script):
    """A root script only hands its flags to a command of the package."""
    text = (REPO / script).read_text()
    assert len(text.splitlines()) <= 8 and "from yolo_tq.cli import script" in text


def test_console_script_lists_and_runs_commands(tmp_path):
    from yolo_tq.cli import COMMANDS

    r = subprocess.run(["yolo-tq", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS)
    r = subprocess.run(["yolo-tq", "layers", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--only-ternary" in r.stdout
    r = subprocess.run(["yolo-tq", "nonsense"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "unknown command 'nonsense'")
    r = subprocess.run(["yolo-tq", "val", str(tmp_path / "none.pt"), "--data", "coco128.yaml"], capture_output=True,
                       text=True, timeout=120)
    assert_one_line_error(r, "checkpoint not found")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model_size: n\ntrain:\n  epochz: 3\n")
    assert_one_line_error(run("train.py", "--config", cfg), "train.epochz", "epochs")


def test_missing_weights(tmp_path):
    assert_one_line_error(run("train.py", "--weights", tmp_path / "nope" / "yolo11n.pt"), "weights not found")


def test_missing_data_yaml(tmp_path, tiny_fp_checkpoint):
    assert_one_line_error(run("train.py", "--weights", tiny_fp_checkpoint, "--data", tmp_path / "none.yaml"),
                          "data yaml not found")


def test_stage_before_previous_exists(tmp_path, tiny_fp_checkpoint, tiny_data):
    r = run("train.py", "--stage", "2", "--weights", tiny_fp_checkpoint, "--data", tiny_data,
            "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(r, "stage 2", "train stage 1 first")


def test_layer_index_model_lacks(tmp_path, tiny_fp_checkpoint, tiny_data):
    r = run("train.py", "--weights", tiny_fp_checkpoint, "--data", tiny_data, "--checkpoint-dir", tmp_path,
            "--set", "stages[0].layers=[17,99]")
    assert_one_line_error(r, "layer 99 does not exist")


def test_checkpoint_of_other_size(tmp_path, tiny_fp_checkpoint, tiny_data):
    r = run("train.py", "--model-size", "s", "--weights", tiny_fp_checkpoint, "--data", tiny_data,
            "--checkpoint-dir", tmp_path)
    assert_one_line_error(r, "yolo11n checkpoint", "yolo11s")


def test_unreadable_checkpoint(tmp_path, tiny_data):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    assert_one_line_error(run("train.py", "--weights", bad, "--data", tiny_data), "cannot read checkpoint")
    assert_one_line_error(run("validate.py", bad, "--data", tiny_data), "cannot read checkpoint")
    assert_one_line_error(run("test.py", bad), "cannot read checkpoint")


def test_test_py_reports_ternary_layers(tmp_path, tiny_fp_checkpoint):
    """test.py judges from the weights: a post-training ternary export shows exactly the plan's convs."""
    from yolo_tq.config import load_config
    from yolo_tq.train.stages import post_training_ternary

    cfg = load_config(REPO / "configs" / "stage1_progressive.yaml")
    out = post_training_ternary(cfg, [0], str(tiny_fp_checkpoint), tmp_path / "ptq.pt")
    r = run("test.py", out, "--json", tmp_path / "rows.json")
    assert r.returncode == 0, r.stderr[-1000:]
    assert "ternary convs: 15 / 88" in r.stdout
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    tern = [x for x in rows if x["ternary"]]
    assert {x["layer"] for x in tern} == {17, 19, 20, 22}
    assert all(x["distinct"] == 3 and 0 < x["sparsity"] < 1 and x["wp"] > 0 and x["wn"] > 0 for x in tern)
