"""Feature reconstruction before a stage trains (distill.reconstruct_steps): routed partial forward, the local loss
falls, only the stage's layers move, the EMA takes the result, the config key is checked."""

import copy
import textwrap

import pytest
import torch

from conftest import build_model
from yolo_tq.config import ConfigError, load_config
from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import install_stage
from yolo_tq.quant.spec import QuantSpec
from yolo_tq.train.reconstruct import forward_outputs, reconstruction_step
from yolo_tq.train.stages import train_stages


def test_forward_outputs_match_the_full_forward():
    """Layers 2 (plain chain), 13 (after a Concat that reads layer 6) and 16: the outputs a full forward hands to
    hooks on those layers."""
    torch.manual_seed(0)
    model = build_model().eval()
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    for i in (2, 13, 16):
        model.model[i].register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out))
    with torch.no_grad():
        model(x)
        full = dict(seen)
        got = forward_outputs(model, x, [2, 13, 16])
    assert all(torch.equal(g, full[i]) for g, i in zip(got, (2, 13, 16)))


def test_reconstruction_fits_the_stage_layers_to_the_teacher():
    torch.manual_seed(0)
    teacher = build_model().eval()
    student = copy.deepcopy(teacher).train()
    install_stage(student, StagePlan("s3", (2, 3, 4), spec=QuantSpec(threshold=0.7)))
    layers = [2, 3, 4]
    params = [p for i in layers for p in student.model[i].parameters()]
    untouched = {n: p.detach().clone() for n, p in student.model[5:].named_parameters()}
    before = [p.detach().clone() for p in params]
    images = torch.rand(4, 3, 64, 64)
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = [reconstruction_step(student, teacher, layers, images, opt) for _ in range(15)]
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(untouched[n], p) for n, p in student.model[5:].named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_detect_head_stage_reconstructs_on_its_raw_predictions():
    """A stage that quantizes the Detect head's inner convs (layer 23): the student (train mode) returns the raw
    prediction dict, the teacher (eval mode) (decoded, dict); both are compared by their boxes and scores. Before this,
    such a stage (configs/plans/int4_all.yaml's last) stopped at its first reconstruction step."""
    from yolo_tq.train.reconstruct import output_tensors

    torch.manual_seed(0)
    teacher = build_model(nc=2).eval()
    student = copy.deepcopy(teacher).train()
    install_stage(student, StagePlan("head", (23,), include_1x1=True, detect_head=True,
                                     spec=QuantSpec(kind="int", bits=4)))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = teacher(images)[1]
        got = forward_outputs(teacher, images, [22, 23])
    assert [t.shape for t in got[1:]] == [raw["boxes"].shape, raw["scores"].shape]
    assert torch.equal(got[1], raw["boxes"]) and torch.equal(got[2], raw["scores"]) and got[0].dim() == 4
    params = [p for p in student.model[23].parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = [reconstruction_step(student, teacher, [23], images, opt) for _ in range(10)]
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]
    with pytest.raises(TypeError, match="a list"):
        output_tensors([torch.zeros(1)])


def _config(tmp_path, weights, data, steps) -> str:
    path = tmp_path / "rec.yaml"
    path.write_text(textwrap.dedent(f"""
        base: {{checkpoint_dir: {tmp_path / 'ckpt'}, weights: {weights}, data: {data}}}
        train: {{epochs: 1, batch: 4, imgsz: 64, workers: 0, device: cpu, plots: false, warmup_epochs: 0,
                 val: false, ultralytics: {{nbs: 4, mosaic: 0.0}}}}
        distill: {{enabled: true, teacher: fp, feature_weight: 1.0, reconstruct_steps: {steps}}}
        stages:
          - {{name: s3, layers: [2, 3, 4], include_1x1: false, threshold: 0.7}}
        """))
    return str(path)


def test_trainer_reconstructs_before_training_and_the_ema_follows(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data, 4))
    seen = {}

    class Stop(Exception):
        pass

    def capture(trainer):
        seen["rec"] = trainer.reconstruction
        model, ema = trainer.model.state_dict(), trainer.ema.ema.state_dict()
        seen["ema_equal"] = all(torch.equal(model[k].float(), ema[k].float()) for k in model)
        raise Stop

    with pytest.raises(Stop):
        train_stages(cfg, [1], callbacks={"on_train_start": capture})
    rec = seen["rec"]
    assert rec["layers"] == [2, 3, 4] and rec["steps"] == 4 and rec["loss_first"] > 0
    assert seen["ema_equal"]


def test_reconstruction_needs_distillation(tmp_path, tiny_fp_checkpoint, tiny_data):
    """Without distillation there is no teacher: the stage trains without reconstruction; bad values are refused."""
    cfg = load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data, 4), None, ["distill.enabled=false"])
    seen = {}

    class Stop(Exception):
        pass

    def capture(trainer):
        seen["rec"] = getattr(trainer, "reconstruction", None)
        raise Stop

    with pytest.raises(Stop):
        train_stages(cfg, [1], callbacks={"on_train_start": capture})
    assert seen == {"rec": None}
    for bad in ("distill.reconstruct_steps=-1", "distill.reconstruct_lr=0"):
        with pytest.raises(ConfigError, match="reconstruct"):
            load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data, 4), None, [bad])


def test_reconstruction_at_its_own_image_size(tmp_path, tiny_fp_checkpoint, tiny_data, monkeypatch):
    """distill.reconstruct_imgsz: the reconstruction steps see images of that size, training keeps train.imgsz."""
    import yolo_tq.train.reconstruct as reconstruct

    cfg = load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data, 3), None, ["distill.reconstruct_imgsz=96"])
    step, sizes, train_size = reconstruct.reconstruction_step, [], []

    def recording_step(student, teacher, layers, images, optimizer):
        sizes.append(tuple(images.shape[-2:]))
        return step(student, teacher, layers, images, optimizer)

    monkeypatch.setattr(reconstruct, "reconstruction_step", recording_step)
    train_stages(cfg, [1], callbacks={"on_train_start": lambda t: train_size.append(t.train_loader.dataset.imgsz)})
    assert sizes == [(96, 96)] * 3 and train_size == [64]
    with pytest.raises(ConfigError, match="reconstruct_imgsz"):
        load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data, 3), None, ["distill.reconstruct_imgsz=100"])
