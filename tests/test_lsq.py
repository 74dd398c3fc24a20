"""LSQ integer weights (Esser et al. 2019) beside TTQ: the math against hand-worked values and the paper's gradient,
the IntConv2d layer on the shared base, the config's `weights: {kind: int, bits: N}`, and a tiny training run."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from yolo_tq.config import ConfigError, load_config, stage_outputs, stage_plan
from yolo_tq.io import load_model
from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import export_ternary, install_stage, quantized_modules, scale_parameters
from yolo_tq.quant.layers import IntConv2d
from yolo_tq.quant.spec import QuantSpec, SpecError
from yolo_tq.quant.ternary import lsq_grad_scale, lsq_initial_step, lsq_levels, lsq_quantize
from yolo_tq.train.stages import train_stages


def test_lsq_forward_and_backward_by_hand():
    """3 bits: Qn = 4, Qp = 3; s = 0.25. v/s = [-4, -1.04, 0, 0.96, 2.4, 8]."""
    w = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.6, 2.0]).reshape(1, 6, 1, 1).requires_grad_()
    s = torch.tensor(0.25).reshape(1, 1, 1, 1).requires_grad_()
    y = lsq_quantize(w, s, 3)
    assert y.flatten().tolist() == [-1.0, -0.25, 0.0, 0.25, 0.5, 0.75]
    y.sum().backward()
    assert w.grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # STE inside (-Qn, Qp) only
    # dv̂/ds summed: -4 (at -Qn) + 0.04 + 0 + 0.04 - 0.4 + 3 (at Qp) = -1.32, times g = 1/sqrt(6·3)
    assert float(s.grad) == pytest.approx(-1.32 / math.sqrt(18), rel=1e-5)


def paper_step_grad(v: list[float], s: float, qn: int, qp: int) -> float:
    """LSQ eq. 3, element by element."""
    total = 0.0
    for x in (vi / s for vi in v):
        total += -qn if x <= -qn else qp if x >= qp else -x + round(x)
    return total


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_follow_the_paper(bits):
    torch.manual_seed(bits)
    w = (torch.randn(3, 5, 2, 2, dtype=torch.float64) * 0.3).requires_grad_()
    s = (torch.rand(3, 1, 1, 1, dtype=torch.float64) * 0.1 + 0.05).requires_grad_()
    g = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    (lsq_quantize(w, s, bits) * g).sum().backward()
    qn, qp = lsq_levels(bits)
    scale = lsq_grad_scale(20, bits)
    for c in range(3):
        grads, v, step = g[c].flatten().tolist(), w[c].detach().flatten().tolist(), float(s[c].detach())
        want = sum(gi * (-qn if x <= -qn else qp if x >= qp else -x + round(x))
                   for gi, x in zip(grads, (vi / step for vi in v))) * scale
        assert float(s.grad[c]) == pytest.approx(want, rel=1e-9, abs=1e-12)
        inside = [(-qn < vi / step < qp) for vi in v]
        assert w.grad[c].flatten().tolist() == [gi if ok else 0.0 for gi, ok in zip(grads, inside)]
    assert paper_step_grad([-1.0, -0.26, 0.0, 0.24, 0.6, 2.0], 0.25, 4, 3) == pytest.approx(-1.32)


def test_lsq_initial_step_and_levels():
    assert lsq_levels(2) == (2, 1) and lsq_levels(4) == (8, 7) and lsq_levels(8) == (128, 127)
    with pytest.raises(ValueError):
        lsq_levels(1)
    w = torch.tensor([[1.0, -3.0], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    step = lsq_initial_step(w, 4)
    assert step.shape == (2, 1, 1, 1)
    assert float(step[0]) == pytest.approx(2 * 2.0 / math.sqrt(7)) and 0 < float(step[1]) <= 1e-8
    assert lsq_grad_scale(100, 4) == pytest.approx(1 / math.sqrt(700))


def test_spec_checks_the_integer_kind():
    assert QuantSpec("int", bits=4).bits == 4
    for bad in ({"bits": 1}, {"bits": 9}, {"bits": 4.0}, {"learn_threshold": True}, {"threshold_per_channel": True}):
        with pytest.raises(SpecError):
            QuantSpec("int", **bad)


@pytest.mark.parametrize("bits", [2, 4])
def test_int_conv_installs_exports_and_fuses(bits):
    torch.manual_seed(0)
    model = build_model(nc=2)
    plan = StagePlan("int", (2, 4), spec=QuantSpec("int", bits=bits))
    paths = install_stage(model, plan)
    layers = quantized_modules(model)
    assert paths and set(layers) == set(paths) and all(type(m) is IntConv2d for m in layers.values())
    steps = [m.quantizer.step for m in layers.values()]
    assert all(any(p is s for p in scale_parameters(model)) for s in steps)  # the learned scales' group
    m = next(iter(layers.values()))
    x = torch.randn(1, m.in_channels, 8, 8)
    w = m.quantizer.fixed(m.latent_weight).detach()
    assert torch.allclose(m(x), F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups))
    qn, qp = lsq_levels(bits)
    codes = w / m.quantizer.step.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -qn and codes.max() <= qp
    exported = export_ternary(model)
    assert not quantized_modules(exported)
    plain = exported.get_submodule(paths[0])
    assert type(plain) is torch.nn.Conv2d and torch.equal(plain.weight, layers[paths[0]].quantizer.fixed(
        layers[paths[0]].latent_weight).detach())
    assert max(torch.unique(c).numel() for c in plain.weight) <= 2 ** bits
    model.eval(), exported.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(img)[0]
        fused = model.fuse(verbose=False)(img)[0]
    assert torch.allclose(before, fused, atol=1e-3, rtol=1e-3)


def test_config_weights_kind(tmp_path):
    cfg = load_config("configs/stage1_progressive.yaml", dotlist=["stages[2].weights={kind: int, bits: 4}"])
    assert stage_plan(cfg, cfg.stages[2]).spec == QuantSpec("int", bits=4)
    assert stage_plan(cfg, cfg.stages[0]).spec.kind == "ttq"  # the default plan stays as it is
    for bad, needle in (("{kind: int, bits: 9}", "bits must be an integer in 2..8"), ("{kind: int4}", "weights takes"),
                        ("{kind: ttq, bits: 4}", "weights.bits is for kind int"), ("{kind: int, step: 1}", "weights takes")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/stage1_progressive.yaml", dotlist=[f"stages[2].weights={bad}"])


def test_a_tiny_int4_stage_trains_and_exports_integer_weights(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg_path = tmp_path / "int4.yaml"
    cfg_path.write_text(textwrap.dedent(f"""
        model_size: n
        base: {{checkpoint_dir: {tmp_path / 'ckpt'}, weights: {tiny_fp_checkpoint}, data: {tiny_data}}}
        train: {{epochs: 1, batch: 4, imgsz: 64, warmup_epochs: 0, workers: 0, device: cpu, plots: false, val: false,
                 ultralytics: {{nbs: 4, mosaic: 0.0, close_mosaic: 0}}}}
        stages:
          - {{name: int4, layers: [2, 4], weights: {{kind: int, bits: 4}}}}
        """))
    cfg = load_config(cfg_path)
    train_stages(cfg, [1])
    trained, _ = load_model(stage_outputs(cfg, cfg.stages[0]).best)
    assert {type(m) for m in quantized_modules(trained).values()} == {IntConv2d}
    exported, _ = load_model(stage_outputs(cfg, cfg.stages[0]).ternary)
    conv = exported.get_submodule(next(iter(quantized_modules(trained))))
    assert type(conv) is torch.nn.Conv2d and max(torch.unique(c).numel() for c in conv.weight.float()) <= 16
