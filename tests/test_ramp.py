"""Gradual ternarisation (train.ternary_ramp): the share mask and its gradients by hand, the schedule, and a tiny
training run whose ramped epochs never become best.pt and whose export is fully ternary."""

import textwrap

import pytest
import torch
import torch.nn as nn

from yolo_tq.config import ConfigError, load_config, stage_outputs
from yolo_tq.io import load_model
from yolo_tq.quant.layers import TTQConv2d
from yolo_tq.quant.spec import QuantSpec
from yolo_tq.quant.ternary import magnitude_mask, partial_ternarize, ternary_values, ttq_ternarize
from yolo_tq.plan import RampPlan
from yolo_tq.train.ramp import ramp_shares
from yolo_tq.train.stages import train_stages


def test_magnitude_mask_takes_the_largest_share():
    w = torch.tensor([0.1, -2.0, 0.5, -0.3, 1.0])
    assert magnitude_mask(w, 0.4).tolist() == [False, True, False, False, True]
    assert magnitude_mask(w, 0.01).tolist() == [False, True, False, False, False]  # at least one
    assert magnitude_mask(w, 1.0).all()


def test_partial_ternarize_values_and_gradients():
    latent = torch.tensor([0.9, -0.05, 0.3, -1.2, 0.6, 0.1], requires_grad=True)
    wp, wn = torch.tensor(0.75, requires_grad=True), torch.tensor(1.2, requires_grad=True)
    t = ttq_ternarize(latent, wp, wn, 0.7)  # Δ = 0.7 · mean|w| = 0.368: [+Wp, 0, 0, -Wn, +Wp, 0]
    y = partial_ternarize(latent, t, 0.5)  # the three largest |w| (1.2, 0.9, 0.6) ternary, the rest as they are
    assert y.tolist() == pytest.approx([0.75, -0.05, 0.3, -1.2, 0.75, 0.1])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    # latent: Wp·g / Wn·g on the ternary ±, identity on the full-precision part; scales: only the ternary part
    assert latent.grad.tolist() == pytest.approx([0.75 * 1, 2, 3, 1.2 * 4, 0.75 * 5, 6])
    assert wp.grad.item() == pytest.approx(1 + 5) and wn.grad.item() == pytest.approx(-4)
    assert partial_ternarize(latent, t, 1.0) is t and partial_ternarize(latent, t, 0.0) is latent


def test_ramp_schedules():
    assert ramp_shares(RampPlan(), 0, 3) == [1.0, 1.0, 1.0]
    mag = RampPlan("magnitude", 4, 0.6)
    assert [ramp_shares(mag, e, 1)[0] for e in range(6)] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.0])
    deep = RampPlan("layer_deep_first", 3, 0.5)
    assert [ramp_shares(deep, e, 3) for e in range(4)] == [[0, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    early = RampPlan("layer_early_first", 3, 0.5)
    assert [ramp_shares(early, e, 3) for e in range(3)] == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    for bad in (dict(mode="sideways"), dict(mode="magnitude", epochs=0), dict(start=1.5)):
        with pytest.raises(ValueError):
            RampPlan(**bad)


def test_export_is_fully_ternary_during_a_ramp():
    torch.manual_seed(0)
    q = TTQConv2d(nn.Conv2d(8, 16, 3), QuantSpec())
    q.quantizer.share = 0.3
    assert ternary_values(q.weight) is None  # the forward mixes full-precision weights in
    plain = q.to_plain_conv()
    assert torch.equal(plain.weight, q.quantizer.ternary(q.latent_weight).detach())
    assert ternary_values(plain.weight) is not None


def ramp_config(tmp, weights, data, ramp_epochs):
    path = tmp / f"ramp{ramp_epochs}.yaml"
    path.write_text(textwrap.dedent(f"""
        base: {{checkpoint_dir: {tmp / 'ckpt'}, weights: {weights}, data: {data}}}
        train: {{epochs: 2, batch: 4, imgsz: 64, warmup_epochs: 0, workers: 0, device: cpu, plots: false,
                 ternary_ramp: magnitude, ternary_ramp_epochs: {ramp_epochs}, ternary_ramp_start: 0.5,
                 ultralytics: {{nbs: 4, mosaic: 0.0, close_mosaic: 0}}}}
        stages: [{{name: stage3, layers: [2, 3], include_1x1: false, threshold: 0.7}}]
        """))
    return path


def test_ramp_must_end_before_the_stage(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(ramp_config(tmp_path, tiny_fp_checkpoint, tiny_data, 2))
    with pytest.raises(ConfigError, match="must be below the stage's epochs"):
        train_stages(cfg, [1])


def test_ramped_training_sets_shares_and_ends_ternary(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(ramp_config(tmp_path, tiny_fp_checkpoint, tiny_data, 1))
    seen = []

    def record(trainer):
        seen.append(sorted({q.share for group in trainer.ramp_groups for q in group}))
    result = train_stages(cfg, [1], callbacks={"on_train_epoch_end": record})[0]
    assert seen == [[0.5], [1.0]]  # epoch 0 half ternary, epoch 1 fully
    best, _ = load_model(result["best"])
    convs = [m for p, m in best.named_modules() if isinstance(m, TTQConv2d)]
    assert convs and all(ternary_values(m.weight) is not None for m in convs)
    exported, _ = load_model(stage_outputs(cfg, cfg.stages[0]).ternary)
    assert sum(ternary_values(m.weight) is not None for m in exported.modules() if isinstance(m, nn.Conv2d)) \
        == len(convs)


def test_freeze_stops_the_latent_weights_in_the_last_epochs(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg_path = ramp_config(tmp_path, tiny_fp_checkpoint, tiny_data, 1)
    cfg = load_config(cfg_path, dotlist=["train.ternary_ramp=none", "train.ternary_ramp_epochs=0",
                                         "train.ternary_freeze_epochs=1"])
    trainable, latents = [], {}

    def record(trainer):
        trainable.append({lat.requires_grad for lat in trainer.stage_latents})
        if trainer.epoch == 1:
            latents.update({i: lat.detach().clone() for i, lat in enumerate(trainer.stage_latents)})

    def after(trainer):
        if trainer.epoch == 1:  # the frozen epoch changed no latent weight
            assert all(torch.equal(latents[i], lat) for i, lat in enumerate(trainer.stage_latents))
    train_stages(cfg, [1], callbacks={"on_train_epoch_start": record, "on_train_epoch_end": after})
    assert trainable == [{True}, {False}] and latents


def test_bn_frozen_stats_keeps_running_statistics(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(ramp_config(tmp_path, tiny_fp_checkpoint, tiny_data, 1),
                      dotlist=["train.ternary_ramp=none", "train.bn_frozen_stats=true"])
    before, _ = load_model(tiny_fp_checkpoint)
    result = train_stages(cfg, [1])[0]
    after, _ = load_model(result["last"])
    bns = [(p, m) for p, m in before.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.running_mean, after.get_submodule(p).running_mean) and
                       torch.equal(m.running_var, after.get_submodule(p).running_var) for p, m in bns)
    assert any(not torch.equal(m.weight, after.get_submodule(p).weight) for p, m in bns)  # the affine trained
