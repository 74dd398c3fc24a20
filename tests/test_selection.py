"""The one layer-selection rule, on models built from Ultralytics' yaml (n and x), and TTQConv2d behaviour."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from conftest import build_model
from src.quantization.shadow_weight_manager import (
    LayerPlan,
    PlanError,
    ShadowWeightManager,
    protected_layers,
    quantized_modules,
    select_convs,
    ternary_values,
)
from src.quantization.ttq_conv import TTQConv2d

STAGES = [LayerPlan((17, 19, 20, 22), True, 0.715), LayerPlan((7, 8, 9, 13, 16), False, 0.715),
          LayerPlan((2, 3, 4, 5, 6), False, 0.7)]


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
    mgr = ShadowWeightManager(model)
    first = mgr.install(STAGES[0])
    q = mgr.quantized[first[0]]
    with torch.no_grad():
        q.latent_weight.add_(0.01)
        q.wp.fill_(0.123)
    second = mgr.install(STAGES[1])
    assert not set(first) & set(second)
    assert mgr.quantized[first[0]] is q and float(q.wp.detach()) == pytest.approx(0.123)
    assert len(mgr.quantized) == len(first) + len(second)


def test_ttq_conv_forward_is_conv_with_ternary_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    q = TTQConv2d(conv, threshold=0.7)
    x = torch.randn(2, 8, 7, 7)
    w = q.weight.detach()
    assert ternary_values(w) is not None and torch.unique(w).numel() == 3
    assert torch.allclose(q(x), nn.functional.conv2d(x, w, conv.bias, padding=1), atol=1e-6)
    assert torch.allclose(q.to_plain_conv()(x), q(x), atol=1e-6)


def test_ttq_conv_bn_fusion_gives_plain_conv_with_same_output():
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    torch.manual_seed(0)
    q = TTQConv2d(nn.Conv2d(4, 8, 3, padding=1, bias=False))
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
    q = TTQConv2d(nn.Conv2d(4, 8, 3))
    q2 = pickle.loads(pickle.dumps(q))
    assert torch.equal(q2.weight, q.weight)
    h = copy.deepcopy(q).half()
    assert h.weight.dtype == torch.float16 and torch.unique(h.weight).numel() <= 3


def test_export_ternary_and_replicate(yolo11n):
    model = copy.deepcopy(yolo11n)
    mgr = ShadowWeightManager(model)
    mgr.install(STAGES[0])
    exported = mgr.export_ternary()
    assert not quantized_modules(exported)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), exported.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], exported(x)[0], atol=1e-4)
    fresh = build_model("yolo11n.yaml")
    replicated = ShadowWeightManager(fresh).replicate_from(model)
    assert set(replicated) == set(mgr.quantized)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], model(x)[0])
