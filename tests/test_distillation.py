"""Distillation losses: zero at equality, positive otherwise; teacher frozen; trains end to end."""

import copy
import textwrap

import pytest
import torch

from conftest import build_model
from yolo_tq.config import load_config, stage_outputs
from yolo_tq.train.distillation import (
    DistillationCriterion,
    box_distillation,
    feature_distillation,
    score_distillation,
)
from yolo_tq.train.stages import train_stages


def test_losses_zero_at_equality_and_positive_otherwise():
    torch.manual_seed(0)
    scores, boxes = torch.randn(2, 5, 30), torch.randn(2, 4 * 16, 30)
    assert score_distillation(scores, scores).abs().item() < 1e-6
    assert box_distillation(boxes, boxes, scores, 16).abs().item() < 1e-6
    assert feature_distillation([boxes], [boxes]).item() == 0.0
    assert score_distillation(scores + 0.5 * torch.randn_like(scores), scores).item() > 1e-3
    assert box_distillation(boxes + torch.randn_like(boxes), boxes, scores, 16).item() > 1e-3
    assert feature_distillation([boxes + 0.1], [boxes]).item() > 0


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student = build_model("yolo11n.yaml", nc=3)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.args = type("A", (), {"box": 7.5, "cls": 0.5, "dfl": 1.5})()
    return student, teacher


def batch_for(n=2, size=64):
    return {"img": torch.rand(n, 3, size, size), "batch_idx": torch.tensor([0.0, 1.0]),
            "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])}


def test_criterion_gradients_skip_teacher_and_teacher_stays_eval(pair):
    student, teacher = pair
    teacher_state = copy.deepcopy(teacher.state_dict())
    teacher.train()  # the criterion must put it back into eval mode
    crit = DistillationCriterion(student.init_criterion(), student, teacher, feature_weight=1.0,
                                 feature_layers=[17, 19, 23])  # 23, the Detect head (wide plan), is left out
    assert crit.layers == (17, 19)
    student.train()
    b = batch_for()
    loss, items = crit(student(b["img"]), b)
    assert loss.shape == (4,) and items["kd_loss"].item() > 0
    loss.sum().backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for k, v in teacher.state_dict().items():  # BN statistics untouched too
        assert torch.equal(v, teacher_state[k]), k
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())


def test_kd_loss_zero_when_student_is_teacher():
    torch.manual_seed(1)
    student = build_model("yolo11n.yaml", nc=3).eval()
    teacher = copy.deepcopy(student)
    student.args = type("A", (), {"box": 7.5, "cls": 0.5, "dfl": 1.5})()
    crit = DistillationCriterion(student.init_criterion(), student, teacher, feature_weight=1.0,
                                 feature_layers=[17])
    b = batch_for()
    _, items = crit(student(b["img"]), b)  # eval-mode student returns (y, preds); the criterion takes preds
    assert items["kd_loss"].abs().item() < 1e-6


def test_distillation_config_trains_end_to_end(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg_path = tmp_path / "kd.yaml"
    cfg_path.write_text(textwrap.dedent(f"""
        base: {{checkpoint_dir: {tmp_path / 'ckpt'}, weights: {tiny_fp_checkpoint}, data: {tiny_data}}}
        train: {{epochs: 2, batch: 4, imgsz: 64, workers: 0, device: cpu, plots: false, warmup_epochs: 0,
                 ultralytics: {{nbs: 4, mosaic: 0.0}}}}
        distill: {{enabled: true, teacher: fp, feature_weight: 0.5}}
        stages:
          - {{name: s1, layers: [19, 22], include_1x1: false, threshold: 0.7}}
        """))
    cfg = load_config(cfg_path)
    kd = []
    train_stages(cfg, [1], callbacks={"on_train_epoch_end": lambda tr: kd.append(float(tr.tloss["kd_loss"]))})
    assert len(kd) == 2 and all(v > 0 for v in kd)
    assert stage_outputs(cfg, cfg.stages[0]).ternary.is_file()
