"""The one layer-selection rule, on models built from Ultralytics' yaml (n and x), and TTQConv2d behaviour."""

import copy
import pickle
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

from conftest import REPO, build_model, progressive_stage_plans
from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import (
    PlanError,
    export_ternary,
    install_like,
    install_stage,
    is_quantized,
    protected_layers,
    quantize_,
    quantized_modules,
    select_convs,
)
from yolo_tq.quant.layers import TTQConv2d
from yolo_tq.quant.spec import QuantSpec, SpecError
from yolo_tq.quant.ternary import ternary_values

STAGES = progressive_stage_plans()


@pytest.fixture(scope="module")
def yolo11n():
    return build_model("yolo11n.yaml")


@pytest.fixture(scope="module")
def yolo11x():
    return build_model("yolo11x.yaml")


@pytest.mark.parametrize("name", ["yolo11n", "yolo11x"])
def test_protected_layers_found_from_model(name, request):
    model = request.getfixturevalue(name)
    prot = protected_layers(model)
    c2psa = [i for i, m in enumerate(model.model) if type(m).__name__ == "C2PSA"]
    assert c2psa and all(i in prot for i in c2psa)
    assert 0 in prot and len(model.model) - 1 in prot
    for bad in (0, c2psa[0], len(model.model) - 1):
        with pytest.raises(PlanError, match="never ternarised"):
            select_convs(model, [bad], True)


@pytest.mark.parametrize("name", ["yolo11n", "yolo11x"])
def test_selection_honours_1x1_switch_and_never_touches_protected(name, request):
    model = request.getfixturevalue(name)
    with_1x1 = select_convs(model, [19, 22], True)
    without = select_convs(model, [19, 22], False)
    assert any(tuple(c.kernel_size) == (1, 1) for c in with_1x1.values())
    assert all(tuple(c.kernel_size) != (1, 1) for c in without.values())
    assert set(without) < set(with_1x1)
    all_paths = set()
    for plan in STAGES:
        all_paths |= set(select_convs(model, plan.layers, plan.include_1x1))
    assert not any(p.startswith(("model.0.", "model.10.", f"model.{len(model.model) - 1}.")) for p in all_paths)


def test_bad_layer_index(yolo11n):
    with pytest.raises(PlanError, match="does not exist"):
        select_convs(yolo11n, [99], False)


def test_yolo11x_stage_plans_select_more_convs_than_n(yolo11n, yolo11x):
    for plan in STAGES:
        assert len(select_convs(yolo11x, plan.layers, plan.include_1x1)) >= len(
            select_convs(yolo11n, plan.layers, plan.include_1x1))


def test_cumulative_install_keeps_earlier_layers():
    model = build_model("yolo11n.yaml")
    first = install_stage(model, STAGES[0])
    q = quantized_modules(model)[first[0]]
    with torch.no_grad():
        q.latent_weight.add_(0.01)
        q.quantizer.wp.fill_(0.123)
    second = install_stage(model, STAGES[1])
    assert not set(first) & set(second)
    assert quantized_modules(model)[first[0]] is q and float(q.quantizer.wp.detach()) == pytest.approx(0.123)
    assert len(quantized_modules(model)) == len(first) + len(second)
    assert all(q.spec == STAGES[0].spec for path, q in quantized_modules(model).items() if path in first)


def test_quantize_swaps_exactly_what_the_filter_selects():
    model = build_model("yolo11n.yaml")
    spec = QuantSpec(threshold=0.5)
    done = quantize_(model, spec, lambda m, path: isinstance(m, nn.Conv2d) and path.startswith("model.2."))
    assert done and all(p.startswith("model.2.") for p in done)
    assert set(quantized_modules(model)) == set(done)
    assert all(type(m) is TTQConv2d and m.spec is spec for m in quantized_modules(model).values())
    with pytest.raises(TypeError, match="no builder"):
        quantize_(model, object(), lambda m, p: True)


def test_spec_validates_and_round_trips():
    spec = QuantSpec(kind="bitlinear_ttq", threshold=0.9, act_bits=4)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    plan = STAGES[2]
    assert StagePlan(**asdict(plan)) == plan
    for bad in ({"threshold": 5.0}, {"rule": "max", "threshold": 1.0}, {"kind": "int4"}, {"act_bits": 1},
                {"scale_grad": "adam"}, {"kind": "bitlinear_ttq", "per_channel": True},
                {"kind": "bitlinear_standard", "learn_threshold": True},
                {"kind": "bitlinear_ttq", "threshold_per_channel": True}):
        with pytest.raises(SpecError):
            QuantSpec(**bad)
    with pytest.raises(SpecError, match="unknown QuantSpec fields"):
        QuantSpec.from_dict({"threshold": 0.7, "thresh": 1})


def test_learned_threshold_is_its_own_parameter():
    """learn_threshold: t is a Parameter (same state-dict key as the buffer), outside the scales, that receives a
    gradient; without it t is a buffer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    fixed, learned = TTQConv2d(conv, QuantSpec()), TTQConv2d(conv, QuantSpec(learn_threshold=True))
    assert fixed.threshold_parameters() == [] and "quantizer.threshold_factor" in dict(fixed.named_buffers())
    assert learned.threshold_parameters() == [learned.quantizer.threshold_factor]
    assert learned.state_dict().keys() == fixed.state_dict().keys()
    assert all(p is not learned.quantizer.threshold_factor for p in learned.scale_parameters())
    assert torch.equal(learned.weight, fixed.weight)  # same start
    learned(torch.randn(2, 8, 7, 7)).square().sum().backward()
    assert learned.quantizer.threshold_factor.grad is not None


def test_per_channel_threshold_layer_keeps_small_channels():
    """threshold_per_channel: each output channel gets Δ = t·mean|w_c|, so a channel far smaller than the rest keeps
    nonzero codes (the layer's Δ zeroes it); the config key reaches the layers' spec."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[0] *= 0.01
    layer, channel = TTQConv2d(conv, QuantSpec()), TTQConv2d(conv, QuantSpec(threshold_per_channel=True))
    assert torch.count_nonzero(layer.weight[0]) == 0 and torch.count_nonzero(channel.weight[0]) > 20
    assert ternary_values(channel.weight) is not None
    assert "per channel" in repr(channel.quantizer)
    from yolo_tq.config import load_config, stage_plan

    cfg = load_config(REPO / "configs" / "stage1_progressive.yaml", None, ["quantization.threshold_per_channel=true"])
    assert all(stage_plan(cfg, s).spec.threshold_per_channel for s in cfg.stages)


def test_ttq_conv_forward_is_conv_with_ternary_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    q = TTQConv2d(conv, QuantSpec(threshold=0.7))
    x = torch.randn(2, 8, 7, 7)
    w = q.weight.detach()
    assert ternary_values(w) is not None and torch.unique(w).numel() == 3
    assert torch.allclose(q(x), nn.functional.conv2d(x, w, conv.bias, padding=1), atol=1e-6)
    assert torch.allclose(q.to_plain_conv()(x), q(x), atol=1e-6)


def test_ttq_conv_bn_fusion_gives_plain_conv_with_same_output():
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    torch.manual_seed(0)
    q = TTQConv2d(nn.Conv2d(4, 8, 3, padding=1, bias=False), QuantSpec())
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = bn(q(x))
        fused = fuse_conv_and_bn(q, bn)
        assert type(fused) is nn.Conv2d
        assert torch.allclose(fused(x), ref, atol=1e-5)


def test_ttq_conv_pickles_and_halves():
    q = TTQConv2d(nn.Conv2d(4, 8, 3), QuantSpec())
    q2 = pickle.loads(pickle.dumps(q))
    assert torch.equal(q2.weight, q.weight)
    h = copy.deepcopy(q).half()
    assert h.weight.dtype == torch.float16 and torch.unique(h.weight).numel() <= 3


def test_export_ternary_and_replicate(yolo11n):
    model = copy.deepcopy(yolo11n)
    installed = install_stage(model, STAGES[0])
    exported = export_ternary(model)
    assert not quantized_modules(exported) and set(quantized_modules(model)) == set(installed)
    assert all(ternary_values(exported.get_submodule(p).weight) is not None for p in installed)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), exported.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], exported(x)[0], atol=1e-4)
    fresh = build_model("yolo11n.yaml")
    replicated = install_like(fresh, model)
    assert set(replicated) == set(installed)
    assert all(is_quantized(fresh.get_submodule(p)) for p in installed)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], model(x)[0])
