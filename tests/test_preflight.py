"""The plan built once and the one preflight: with --stage all, a bad setting of the last stage fails before the
first trains; a resumed stage keeps the teacher its plan fixed; the plan survives asdict and back."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import StopTraining, assert_one_line_error, run_here, train_first_epoch_only
from yolo_tq.config import ConfigError, load_config, stage_outputs
from yolo_tq.plan import TrainPlan
from yolo_tq.quant.apply import PlanError
from yolo_tq.train.preflight import plan_stages, preflight
from yolo_tq.train.stages import train_stages


def three_stage_config(tmp: Path, weights: Path, data: Path, stage3: str = "{name: s3, layers: [6]}",
                       distill: str = "") -> Path:
    cfg = tmp / "three.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model_size: n
        base: {{checkpoint_dir: {tmp / 'ckpt'}, weights: {weights}, data: {data}}}
        train: {{epochs: 2, batch: 4, imgsz: 64, warmup_epochs: 0, workers: 0, device: cpu, plots: false,
                 ultralytics: {{nbs: 4, mosaic: 0.0, close_mosaic: 0}}}}
        {distill}
        stages:
          - {{name: s1, layers: [2]}}
          - {{name: s2, layers: [4]}}
          - {stage3}
        """))
    return cfg


@pytest.mark.parametrize("stage3, needle", [
    ("{name: s3, layers: [6], train: {ternary_ramp: magnitude, ternary_ramp_epochs: 2}}",
     "stage 's3': ternary_ramp_epochs (2) must be below"),
    ("{name: s3, layers: [6], train: {final_imgsz: 96, final_epochs: 2}}", "stage 's3': final_epochs (2) must be below"),
    ("{name: s3, layers: [6], train: {ternary_ramp: magnitude}}",
     "stage 's3': ternary_ramp 'magnitude' needs ternary_ramp_epochs >= 1"),
    ("{name: s3, layers: [99]}", "stage 3 (s3): layer 99 does not exist"),  # only the model can tell: the preflight
])
def test_a_bad_last_stage_fails_before_the_first_trains(tmp_path, tiny_fp_checkpoint, tiny_data, stage3, needle):
    cfg = three_stage_config(tmp_path, tiny_fp_checkpoint, tiny_data, stage3)
    r = run_here("train.py", "--config", cfg, "--stage", "all")
    assert_one_line_error(r, needle)
    assert not (tmp_path / "ckpt").exists()  # nothing trained, no folder made


def test_a_missing_teacher_of_a_later_stage_fails_in_the_preflight(tmp_path, tiny_fp_checkpoint, tiny_data):
    distill = f"distill: {{enabled: true, teacher: {tmp_path / 'nowhere.pt'}}}"
    cfg = load_config(three_stage_config(tmp_path, tiny_fp_checkpoint, tiny_data, distill=distill))
    planned = plan_stages(cfg, [1, 2, 3])
    with pytest.raises(Exception, match="stage 1 \\(s1\\): distillation teacher not found"):
        preflight(cfg, planned)


def test_later_stages_are_planned_from_the_earlier_outputs(tmp_path, tiny_fp_checkpoint, tiny_data):
    distill = "distill: {enabled: true, teacher: start}"
    cfg = load_config(three_stage_config(tmp_path, tiny_fp_checkpoint, tiny_data, distill=distill))
    planned = plan_stages(cfg, [1, 2, 3])
    preflight(cfg, planned)  # stage 2's and 3's teachers are written by this run: accepted
    assert [s.number for s in planned] == [1, 2, 3] and planned[0].start == str(tiny_fp_checkpoint)
    for before, s in zip(planned, planned[1:]):
        assert s.start == str(before.outputs.best)
        assert s.plan.distill.teacher == str(before.outputs.best.resolve())
    assert all(TrainPlan(**asdict(s.plan)) == s.plan for s in planned)
    with pytest.raises(ConfigError, match="stage 4 does not exist"):
        plan_stages(cfg, [4])
    with pytest.raises(PlanError, match="stage 2 \\(s2\\)"):
        bad = load_config(three_stage_config(tmp_path, tiny_fp_checkpoint, tiny_data, distill=distill),
                          dotlist=["stages[1].layers=[23]"])
        preflight(bad, plan_stages(bad, [1, 2, 3]))


def test_resume_keeps_the_teacher_the_plan_fixed(tmp_path, tiny_fp_checkpoint, tiny_data):
    """teacher: start is the stage's start checkpoint. A resume starts from last.pt, and must not make the student's
    own checkpoint its teacher: the plan comes back from last.pt as it was saved."""
    cfg = load_config(three_stage_config(tmp_path, tiny_fp_checkpoint, tiny_data,
                                         distill="distill: {enabled: true, teacher: start}"))
    fixed = str(Path(tiny_fp_checkpoint).resolve())
    assert plan_stages(cfg, [1])[0].plan.distill.teacher == fixed

    train_first_epoch_only(cfg)
    resumed = plan_stages(cfg, [1], resume=True)[0]
    assert resumed.start == str(stage_outputs(cfg, cfg.stages[0]).last) and resumed.resumed == (1, 2)
    assert resumed.plan.distill.teacher == fixed
    seen = {}

    def capture(trainer):
        seen["teacher"] = trainer.plan.distill.teacher
        seen["loaded"] = trainer.model.criterion.teacher is not None
        raise StopTraining

    with pytest.raises(StopTraining):
        train_stages(cfg, [1], resume=True, callbacks={"on_pretrain_routine_end": capture})
    assert seen == {"teacher": fixed, "loaded": True}
