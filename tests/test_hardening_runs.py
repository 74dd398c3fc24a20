"""Hardening of training runs (issue 24, items 4, 5 and 7): a resume binds to the folder it resumes and to the config
its last.pt was trained with; a signal whose exception something swallowed still ends the run; temporaries of an
interrupted save are removed; a stage counts as finished only when best.pt and ternary.pt load (tiny data, CPU)."""

import gc
import hashlib
import os
import shutil
import signal
import weakref
from pathlib import Path

import pytest

from yolo_tq.config import ConfigError, load_config, stage_outputs
from yolo_tq.io import CheckpointError
from yolo_tq.train.guard import StageRun, raise_on_signals
from yolo_tq.train.preflight import checkpoint_loads, plan_stages, stage_finished
from yolo_tq.train.stages import train_stages

from conftest import train_first_epoch_only
from test_training import write_config


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (lock files aside), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    """Stage 1 of a 2-epoch run stopped after epoch 1 was saved (last.pt holds epoch 0)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    cfg = load_config(write_config(tmp, tiny_fp_checkpoint, tiny_data, epochs=2))
    train_first_epoch_only(cfg)
    return cfg


def copy_to(cfg, tmp_path: Path, epochs: int = 2, dotlist=()):
    """The interrupted stage folder copied under a new config's checkpoint_dir; (new config, its outputs)."""
    new = load_config(write_config(tmp_path, Path(cfg.base.weights), Path(cfg.base.data), epochs=epochs),
                      dotlist=list(dotlist))
    src, dst = stage_outputs(cfg, cfg.stages[0]), stage_outputs(new, new.stages[0])
    shutil.copytree(src.dir, dst.dir)
    return new, dst


# --- item 4: resume binds to its folder and its config -----------------------------------------------------------

def test_resume_of_a_copied_folder_writes_only_into_the_copy(interrupted, tmp_path):
    original = stage_outputs(interrupted, interrupted.stages[0]).dir
    before = digest(original)
    cfg, dst = copy_to(interrupted, tmp_path)
    result, = train_stages(cfg, [1], resume=True)
    assert digest(original) == before  # the original folder is untouched
    assert Path(result["ternary"]) == dst.ternary and dst.ternary.is_file() and dst.best.is_file()
    assert stage_finished(dst)
    assert len((dst.dir / "results.csv").read_text().strip().splitlines()) == 1 + 2


@pytest.mark.parametrize("dotlist, key", [
    (["stages[0].layers=[17,19]"], "stage.layers"),
    (["stages[0].threshold=0.9"], "stage.spec.threshold"),
    (["train.imgsz=96"], "imgsz"),
    (["train.lr0=0.01"], "lr0"),
    (["distill.enabled=true"], "distill"),
])
def test_resume_with_a_changed_config_is_refused_naming_the_key(interrupted, tmp_path, dotlist, key):
    cfg, dst = copy_to(interrupted, tmp_path, dotlist=dotlist)
    before = digest(dst.dir)
    with pytest.raises(ConfigError) as e:
        train_stages(cfg, [1], resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "cannot resume stage 1" in msg and key in msg and "--accept-changes" in msg
    assert digest(dst.dir) == before


def test_resume_with_changed_epochs_is_refused(interrupted, tmp_path):
    cfg, dst = copy_to(interrupted, tmp_path, epochs=3)
    with pytest.raises(ConfigError, match="epochs"):
        plan_stages(cfg, [1], resume=True)


def test_accept_changes_resumes_with_the_saved_settings(interrupted, tmp_path):
    cfg, dst = copy_to(interrupted, tmp_path, dotlist=["train.imgsz=96", "stages[0].threshold=0.9"])
    stage, = plan_stages(cfg, [1], resume=True, accept_changes=True)
    assert stage.plan.stage.spec.threshold == 0.715  # the saved plan, not the changed config
    assert "imgsz" not in stage.trainer_args  # Ultralytics takes it from last.pt
    assert stage.trainer_args["save_dir"] == str(dst.dir.resolve())


def test_an_unchanged_config_resumes_without_a_word(interrupted, tmp_path):
    cfg, dst = copy_to(interrupted, tmp_path)
    stage, = plan_stages(cfg, [1], resume=True)
    assert stage.resumed == (1, 2) and stage.start == str(dst.last)


# --- item 7: kill-safety ----------------------------------------------------------------------------------------

def test_temporaries_of_an_interrupted_save_are_removed_with_a_line(tmp_path, capsys):
    folder = tmp_path / "stage1"
    (folder / "weights").mkdir(parents=True)
    left = [folder / "weights" / ".last.pt.abc123.tmp", folder / "weights" / ".best.pt.strip.tmp",
            folder / ".ternary.pt.x9.tmp"]
    for p in left:
        p.write_bytes(b"x" * 100)
    keep = folder / "weights" / "last.pt"
    keep.write_bytes(b"kept")
    run = StageRun(folder, 1)
    with run.guard():
        pass
    assert not any(p.exists() for p in left) and keep.read_bytes() == b"kept"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "removed 3 temporary file(s)" in err[0] and str(left[0]) in err[0]


def test_a_stage_whose_final_saves_were_killed_is_not_finished_and_resume_completes_it(interrupted, tmp_path):
    cfg, dst = copy_to(interrupted, tmp_path)
    train_stages(cfg, [1], resume=True)
    assert stage_finished(dst)
    dst.ternary.unlink()  # the kill came before the ternary export
    dst.best.write_bytes(dst.best.read_bytes()[:1000])  # ... and during the best.pt save
    assert not stage_finished(dst)
    result, = train_stages(cfg, [1], resume=True)
    assert sorted(result["completed"]) == sorted([str(dst.best), str(dst.ternary)])
    assert stage_finished(dst) and checkpoint_loads(dst.ternary)
    with pytest.raises(CheckpointError, match="finished training"):  # now it is finished
        train_stages(cfg, [1], resume=True)


def test_a_damaged_ternary_export_makes_a_stage_unfinished(interrupted, tmp_path):
    cfg, dst = copy_to(interrupted, tmp_path)
    train_stages(cfg, [1], resume=True)
    dst.ternary.write_bytes(b"")
    assert not stage_finished(dst)
    result, = train_stages(cfg, [1], resume=True)
    assert result["completed"] == [str(dst.ternary)] and stage_finished(dst)


# --- item 5: a signal is honoured wherever it lands ---------------------------------------------------------------

class Target:
    pass


def sigterm_in_a_weakref_callback() -> None:
    """A SIGTERM delivered while Python runs a weakref callback: the callback's exception is only printed."""
    obj = Target()
    ref = weakref.ref(obj, lambda _: os.kill(os.getpid(), signal.SIGTERM))
    del obj
    gc.collect()
    assert ref() is None


def test_a_signal_swallowed_in_a_weakref_callback_still_ends_the_block():
    from yolo_tq.train.guard import Interrupted

    with pytest.raises(Interrupted) as e:
        with raise_on_signals() as received:
            sigterm_in_a_weakref_callback()
            assert received == [signal.SIGTERM]  # the run went on: the exception was swallowed
    assert e.value.signum == signal.SIGTERM


def test_a_swallowed_sigterm_ends_the_run_with_143(tmp_path, capsys):
    run = StageRun(tmp_path / "stage1", 1)
    with pytest.raises(SystemExit) as e:
        with run.guard():
            sigterm_in_a_weakref_callback()
            run.check_signals()  # a trainer callback (stages.SIGNAL_CHECKS) sees it at the next event
            raise AssertionError("the run went on after SIGTERM")
    assert e.value.code == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in capsys.readouterr().err


# --- item 5: a validation that cannot mean what it says ----------------------------------------------------------

def test_a_model_whose_class_count_is_not_the_datas_is_refused(tmp_path, tiny_data):
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_tq.eval.validate import validate
    from yolo_tq.io import save_stock_checkpoint

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    path = save_stock_checkpoint(model, tmp_path / "three.pt")
    with pytest.raises(ConfigError) as e:
        validate(path, str(tiny_data), imgsz=64, batch=4, device="cpu")
    assert "\n" not in str(e.value) and "detects 3 classes" in str(e.value) and "has 2" in str(e.value)


def data_with_nan_labels(tmp_path: Path, tiny_data: Path, n: int) -> Path:
    """A copy of the tiny dataset whose first `n` val labels hold a NaN coordinate; its data yaml."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    data = root / "tiny.yaml"
    data.write_text(data.read_text().replace(str(tiny_data.parent), str(root)))
    for cache in root.rglob("*.cache"):
        cache.unlink()
    for label in sorted((root / "labels" / "val").glob("*.txt"))[:n]:
        label.write_text("0 nan 0.5 0.2 0.2\n")
    return data


def test_dropped_val_images_are_a_warning_in_the_result(tmp_path, tiny_data, tiny_fp_checkpoint):
    from yolo_tq.eval.validate import validate

    data = data_with_nan_labels(tmp_path, tiny_data, 2)  # half the val images: Ultralytics drops them
    r = validate(tiny_fp_checkpoint, str(data), imgsz=64, batch=4, device="cpu")
    assert r["warnings"] == ["warning: 2 of 4 val images were dropped (corrupt image or label, see Ultralytics' "
                             "warnings): this mAP is over the other 2 only"]
    clean = validate(tiny_fp_checkpoint, str(tiny_data), imgsz=64, batch=4, device="cpu")
    assert "warnings" not in clean


def test_dropped_images_warning_counts():
    from yolo_tq.eval.validate import dropped_images_warning

    assert dropped_images_warning("val", 128, 128) is None
    assert "1 of 128 val images" in dropped_images_warning("val", 128, 127)


def test_val_prints_the_dropped_images_warning_last(tmp_path, tiny_data, tiny_fp_checkpoint):
    from conftest import run_here

    data = data_with_nan_labels(tmp_path, tiny_data, 1)
    r = run_here("validate.py", str(tiny_fp_checkpoint), "--data", str(data), "--imgsz", "64", "--batch", "4",
                 "--device", "cpu", "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("warning: 1 of 4 val images were dropped")
    import json
    assert json.loads((tmp_path / "m.json").read_text())["warnings"][0].startswith("warning: 1 of 4")
