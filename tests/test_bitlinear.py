"""BitLinear_TTQ and standard BitLinear in C2PSA: hand-worked forward, gradients, replacement on n/x, pretrained
initialisation, BatchNorm fusion, checkpoints and training, compare_bitlinear, ONNX export."""

from __future__ import annotations

import copy
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, build_model, c2psa_plan
from yolo_tq.quant import layers as L
from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import (PSA_CONVS, c2psa_convs, install_like, install_stage, is_quantized, quantized_modules,
                                 scale_parameters)
from yolo_tq.quant.layers import (bitlinear_conv2d, channel_fold_scale, is_pointwise, quantize_tokens,
                                  token_layer_norm)
from yolo_tq.quant.spec import QuantSpec, SpecError
from yolo_tq.quant.ternary import initial_scales, ternary_threshold, ternary_values
from yolo_tq.quant.layers import TTQConv2d


def _spec(kind: str, per_token: bool = True, **kw) -> QuantSpec:
    return QuantSpec(kind=kind, act_per_token=per_token, **kw)


def BitLinear_TTQ(conv, **kw):  # noqa: N802 - builds the layer from keyword settings, as the tests read best
    return L.BitLinear_TTQ(conv, _spec("bitlinear_ttq", **kw))


def BitLinear_Standard(conv, **kw):  # noqa: N802
    return L.BitLinear_Standard(conv, _spec("bitlinear_standard", **kw))


def replace_c2psa(model, kind):
    return install_stage(model, c2psa_plan(kind))


def psa_blocks(model):
    return sorted({p.rsplit(".", 3)[0] for p in c2psa_convs(model)})

LATENT = torch.tensor([[0.9, -0.05, 0.3], [-1.2, 0.6, 0.1]]).view(2, 3, 1, 1)
BIAS = torch.tensor([0.25, -0.5])
# two tokens (pixels) of three channels: centred values [-2, -1, 3] and [3, -1, -2], both with σ² = 14/3
X = torch.tensor([[0.0, 1.0, 5.0], [4.0, 0.0, -1.0]]).t().reshape(1, 3, 1, 2)
MEANS = torch.tensor([2.0, 1.0])
CODES = torch.tensor([[-85.0, -42.0, 127.0], [127.0, -42.0, -85.0]])  # round(127·(x−μ)/max|x−μ|)
GAMMA = 3 / math.sqrt(14 / 3 + 1e-5)  # max|x̂| of both tokens


def hand_conv(bias=True) -> nn.Conv2d:
    conv = nn.Conv2d(3, 2, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(LATENT)
        if bias:
            conv.bias.copy_(BIAS)
    return conv


def tokens(y: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, T) -> (T, C)"""
    return y[0, :, 0, :].t()


# ------------------------------------------------------------------------------------------ forward, by hand
def test_token_layer_norm_is_layernorm_over_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4) * 4 + 2
    g, b = torch.rand(5) + 0.5, torch.randn(5)
    u, mean, std = token_layer_norm(x, g, b, 1e-5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), g, b, 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(u, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.mean(1, keepdim=True))
    torch.testing.assert_close(std, (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt())


def test_activation_codes_by_hand_and_in_range():
    q = BitLinear_TTQ(hand_conv())
    codes, gamma = q.activation_codes(X)
    assert torch.equal(tokens(codes), CODES)
    torch.testing.assert_close(gamma.flatten(), torch.full((2,), GAMMA))
    big = torch.randn(4, 3, 8, 8) * 1000 + 300
    codes, gamma = q.activation_codes(big)
    assert codes.min() >= -128 and codes.max() <= 127 and torch.equal(codes, codes.round())
    assert (codes.abs().amax(dim=1) == 127).all()  # every token uses the full range
    assert gamma.shape == (4, 1, 8, 8)


def test_per_tensor_scale():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 4, 4)
    codes, gamma, _, _ = quantize_tokens(x, None, None, 1e-5, 8, per_token=False)
    u, _, _ = token_layer_norm(x, None, None, 1e-5)
    assert gamma.numel() == 1 and float(gamma) == pytest.approx(float(u.abs().max()))
    torch.testing.assert_close(codes, torch.round(u * 127 / gamma))
    token_max = codes.abs().amax(dim=1)
    assert token_max.max() == 127 and (token_max < 120).any()  # one scale: most tokens use less than the range
    x = torch.randn(2, 3, 4, 4)
    codes, gamma, _, _ = quantize_tokens(x, None, None, 1e-5, 8, per_token=False)
    q = BitLinear_TTQ(hand_conv(), per_token=False, restore_token_stats=False)
    torch.testing.assert_close(q(x), F.conv2d(codes, q.weight) * gamma / 127 + BIAS.view(1, -1, 1, 1))


def test_bitlinear_ttq_forward_by_hand():
    q = BitLinear_TTQ(hand_conv(), threshold=0.7, restore_token_stats=False)
    # Δ = 0.7 · mean|w| = 0.3675: 0.9 and 0.6 positive, −1.2 negative; Ap = mean(0.9, 0.6), An = 1.2
    assert q.quantizer.wp.item() == pytest.approx(0.75) and q.quantizer.wn.item() == pytest.approx(1.2)
    with torch.no_grad():
        q.quantizer.wp.fill_(0.5)
        q.quantizer.wn.fill_(2.0)
    assert torch.equal(q.weight.detach().view(2, 3), torch.tensor([[0.5, 0, 0], [-2.0, 0.5, 0]]))
    # codes · W_t: [-85·0.5, 85·2 − 42·0.5] = [-42.5, 149] ; [127·0.5, −127·2 − 42·0.5] = [63.5, −275]
    expected = torch.tensor([[-42.5, 149.0], [63.5, -275.0]]) * GAMMA / 127 + BIAS
    torch.testing.assert_close(tokens(q(X).detach()), expected)


def test_restored_token_stats_by_hand():
    q = BitLinear_TTQ(hand_conv(), threshold=0.7)  # restore_token_stats on (default)
    with torch.no_grad():
        q.quantizer.wp.fill_(0.5)
        q.quantizer.wn.fill_(2.0)
    # σ·γ/127 = 3/127 for both tokens; plus μ · row sums of W_t = μ · [0.5, −1.5]
    conv = torch.tensor([[-42.5, 149.0], [63.5, -275.0]])
    expected = conv * 3 / 127 + MEANS.view(2, 1) * torch.tensor([0.5, -1.5]) + BIAS
    torch.testing.assert_close(tokens(q(X).detach()), expected, rtol=1e-5, atol=1e-5)
    # and that is W_t ⊛ x up to the 8-bit rounding
    exact = tokens(F.conv2d(X, q.weight.detach(), BIAS))
    assert (tokens(q(X).detach()) - exact).abs().max() < 0.03


def test_standard_bitlinear_forward_by_hand():
    q = BitLinear_Standard(hand_conv(), restore_token_stats=False)
    beta = LATENT.abs().mean()  # 0.525: W/β rounds to [[2, 0, 1], [−2, 1, 0]], clipped to [[1, 0, 1], [−1, 1, 0]]
    assert torch.equal(q.weight.detach().view(2, 3), beta * torch.tensor([[1.0, 0, 1], [-1, 1, 0]]))
    assert q.scale_parameters() == [] and is_quantized(q)
    # codes · W_q / β: [−85 + 127, 85 − 42] = [42, 43] ; [127 − 85, −127 − 42] = [42, −169]
    expected = torch.tensor([[42.0, 43.0], [42.0, -169.0]]) * beta * GAMMA / 127 + BIAS
    torch.testing.assert_close(tokens(q(X).detach()), expected)


def test_layernorm_affine_changes_what_is_quantized():
    q = BitLinear_TTQ(hand_conv(), restore_token_stats=False)
    with torch.no_grad():
        q.norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0]))
        q.norm.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    codes, gamma = q.activation_codes(X)
    x_hat = torch.tensor([[-2.0, -1.0, 3.0], [3.0, -1.0, -2.0]]) / math.sqrt(14 / 3 + 1e-5)
    u = x_hat * torch.tensor([1.0, 2.0, 1.0]) + torch.tensor([0.0, 0.0, 1.0])
    g = u.abs().amax(dim=1, keepdim=True)
    assert torch.equal(tokens(codes), torch.round(u * 127 / g))
    torch.testing.assert_close(gamma.flatten(), g.flatten())


def test_depthwise_3x3_dequantises_before_the_conv():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False)
    assert not is_pointwise(conv.kernel_size, conv.stride, conv.padding)
    assert is_pointwise((1, 1), (1, 1), (0, 0))
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    for restore in (False, True):
        q = BitLinear_TTQ(conv, restore_token_stats=restore)
        codes, gamma, mean, std = quantize_tokens(x, q.norm.weight, q.norm.bias, 1e-5, 8, True)
        dequant = codes * gamma / 127 * std + mean if restore else codes * gamma / 127
        ref = F.conv2d(dequant, q.weight, None, 1, 1, 1, 8)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    # with the token statistics restored, it is the ternary conv of x up to the 8-bit rounding
    fp_act = F.conv2d(x, q.weight, None, 1, 1, 1, 8)
    assert ((q(x) - fp_act).norm() / fp_act.norm()) < 0.02


# ------------------------------------------------------------------------------------------ gradients
def _weight_grad_reference(q, x, g):
    """dL/dW_t of L = Σ g·y, with the ternary weight as a leaf (same activation path)."""
    w = q.weight.detach().clone().requires_grad_(True)
    y = bitlinear_conv2d(x, w, q.bias, q.norm.weight, q.norm.bias, eps=q.norm.eps, bits=q.spec.act_bits,
                         per_token=q.spec.act_per_token, restore_token_stats=q.spec.restore_token_stats, out_scale=q.out_scale,
                         stride=q.stride, padding=q.padding, dilation=q.dilation, groups=q.groups)
    (y * g).sum().backward()
    return w.grad


@pytest.mark.parametrize("kernel", [1, 3])
def test_ap_an_and_latent_gradients_follow_ttq(kernel):
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 6, kernel, 1, kernel // 2, groups=1 if kernel == 1 else 6, bias=False)
    q = BitLinear_TTQ(conv, threshold=0.7)
    x, g = torch.randn(2, 6, 5, 5) * 2, torch.randn(2, 6, 5, 5)
    gw = _weight_grad_reference(q, x, g)
    (q(x) * g).sum().backward()
    w = q.latent_weight.detach()
    delta = ternary_threshold(w, 0.7, "mean")
    pos, neg = w > delta, w < -delta
    assert pos.any() and neg.any() and (~pos & ~neg).any()
    # dL/dAp = Σ_{w>Δ} g_t ; dL/dAn = −Σ_{w<−Δ} g_t ; dL/dw = Ap·g_t, g_t, An·g_t on the three sets
    torch.testing.assert_close(q.quantizer.wp.grad, gw[pos].sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.quantizer.wn.grad, -gw[neg].sum(), rtol=1e-4, atol=1e-5)
    expected = torch.where(pos, q.quantizer.wp.detach() * gw, torch.where(neg, q.quantizer.wn.detach() * gw, gw))
    torch.testing.assert_close(q.latent_weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_ste_reaches_layernorm_by_formula():
    """Without the token statistics, y = (γ/127)·W_t⊛codes: with the STE, dL/du = W_tᵀ·g at every token, so
    dL/dLN.weight = Σ (W_tᵀg)·x̂ and dL/dLN.bias = Σ W_tᵀg."""
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 3, 1, bias=False)
    q = BitLinear_TTQ(conv, restore_token_stats=False)
    with torch.no_grad():
        q.norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 4, 3, 3) * 3).requires_grad_(True)
    g = torch.randn(2, 3, 3, 3)
    (q(x) * g).sum().backward()
    wt = q.weight.detach().view(3, 4)
    du = torch.einsum("oc,bohw->bchw", wt, g)
    x_hat, _, _ = token_layer_norm(x.detach(), None, None, q.norm.eps)
    torch.testing.assert_close(q.norm.weight.grad, (du * x_hat).sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.norm.bias.grad, du.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [BitLinear_TTQ, BitLinear_Standard])
def test_gradients_reach_latent_weights_and_layernorm_with_token_stats(cls):
    torch.manual_seed(5)
    q = cls(nn.Conv2d(4, 6, 1, bias=False))
    x = torch.randn(2, 4, 3, 3) * 2 + 1
    g = torch.randn(2, 6, 3, 3)
    gw = _weight_grad_reference(q, x, g)
    (q(x) * g).sum().backward()
    assert q.norm.weight.grad.abs().sum() > 0 and q.norm.bias.grad.abs().sum() > 0
    if cls is BitLinear_Standard:  # absmean STE: the latent weight gets dL/dW_q unchanged
        torch.testing.assert_close(q.latent_weight.grad, gw, rtol=1e-4, atol=1e-6)
    else:
        assert q.latent_weight.grad.abs().sum() > 0 and q.quantizer.wp.grad is not None and q.quantizer.wn.grad is not None


# ------------------------------------------------------------------------------------------ replacement
@pytest.fixture(scope="module")
def yolo11n():
    torch.manual_seed(0)
    return build_model("yolo11n.yaml", nc=2)


@pytest.mark.parametrize("name,blocks", [("yolo11n.yaml", 1), ("yolo11x.yaml", 2)])
def test_replacement_counts_every_psablock(name, blocks, request):
    model = request.getfixturevalue("yolo11n") if name == "yolo11n.yaml" else build_model(name, nc=2)
    model = copy.deepcopy(model)
    originals = {p: c.weight.detach().clone() for p, c in c2psa_convs(model).items()}
    assert len(psa_blocks(model)) == blocks
    replaced = replace_c2psa(model, "bitlinear_ttq")
    assert len(replaced) == 5 * blocks == len(originals)
    assert set(replaced) == {f"{b}.{sub}.conv" for b in psa_blocks(model) for sub in PSA_CONVS}
    for path in replaced:
        q = model.get_submodule(path)
        assert isinstance(q, L.BitLinear_TTQ) and q.spec.act_bits == 8
        wrapper = model.get_submodule(path.rsplit(".", 1)[0])
        assert isinstance(wrapper.bn, nn.BatchNorm2d) and hasattr(wrapper, "act")  # wrappers stay
        assert torch.equal(q.latent_weight, originals[path])  # initialised from the conv, not random
        wp, wn = initial_scales(originals[path], ternary_threshold(originals[path], 0.7, "mean"))
        assert torch.equal(q.quantizer.wp.detach(), wp) and torch.equal(q.quantizer.wn.detach(), wn)
        assert ternary_values(q.weight) is not None
    assert type(model.model[10].cv1.conv) is nn.Conv2d and type(model.model[10].cv2.conv) is nn.Conv2d
    assert replace_c2psa(model, "bitlinear_ttq") == []  # already quantized: kept
    widths = {model.get_submodule(p).in_channels for p in replaced}
    assert widths == ({128, 256} if name == "yolo11n.yaml" else {384, 768})


def test_replacement_keeps_ttq_layers_and_standard_mode(yolo11n):
    model = copy.deepcopy(yolo11n)
    ttq = install_stage(model, StagePlan("s3", (2, 3, 4, 5, 6)))
    replaced = replace_c2psa(model, "bitlinear_standard")
    q = quantized_modules(model)
    assert set(q) == set(ttq) | set(replaced)
    assert all(isinstance(q[p], TTQConv2d) for p in ttq)
    assert all(isinstance(q[p], L.BitLinear_Standard) for p in replaced)
    assert len(scale_parameters(model)) == 2 * len(ttq)  # standard BitLinear learns no scales
    with pytest.raises(SpecError, match="unknown quantization kind"):
        replace_c2psa(model, "bitlinear_other")


def test_real_scale_inputs_close_to_the_conv():
    """Inputs at the scale of a trained network (per-channel offsets, std ≫ 1): the layer reproduces the ternary
    conv of x to within the 8-bit rounding, and stays close to the FP conv it was initialised from."""
    torch.manual_seed(6)
    conv = nn.Conv2d(64, 128, 1, bias=False)
    x = torch.randn(2, 64, 10, 10) * (torch.rand(1, 64, 1, 1) * 4) + torch.randn(1, 64, 1, 1) * 2
    fp = conv(x).detach()
    for cls in (BitLinear_TTQ, BitLinear_Standard):
        q = cls(conv)
        y = q(x).detach()
        ternary_fp_act = F.conv2d(x, q.weight.detach())
        assert ((y - ternary_fp_act).norm() / ternary_fp_act.norm()) < 0.02
        assert F.cosine_similarity(y.flatten(), fp.flatten(), dim=0) > 0.8
        plain = cls(conv, restore_token_stats=False)(x).detach()  # BitNet as printed: the token scale is lost
        assert ((plain - ternary_fp_act).norm() / ternary_fp_act.norm()) > 0.3


def test_pretrained_c2psa_layers_close_on_real_images(shared_weights, shared_data):
    import cv2

    from yolo_tq.io import load_model

    model, _ = load_model(shared_weights)
    images = sorted((shared_data.parent / "images").rglob("*.jpg"))[:2]
    x = torch.stack([torch.from_numpy(cv2.resize(cv2.imread(str(p)), (320, 320))[:, :, ::-1].copy())
                     .permute(2, 0, 1).float() / 255 for p in images])
    convs = c2psa_convs(model)
    seen = {}
    hooks = [c.register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, (i[0], o))) for p, c in convs.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for path, conv in convs.items():
        xin, out = seen[path]
        for cls in (BitLinear_TTQ, BitLinear_Standard):
            q = cls(conv)
            with torch.no_grad():
                y = q(xin)
                ternary_fp_act = F.conv2d(xin, q.weight, None, q.stride, q.padding, q.dilation, q.groups)
            assert ((y - ternary_fp_act).norm() / ternary_fp_act.norm()) < 0.03, path
            assert F.cosine_similarity(y.flatten(), out.flatten(), dim=0) > 0.75, (path, cls.__name__)


# ------------------------------------------------------------------------------------------ BatchNorm fusion
def _randomise_bn(model):
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)


@pytest.mark.parametrize("cls", [BitLinear_TTQ, BitLinear_Standard])
def test_conv_bn_fusion_keeps_outputs(cls):
    from ultralytics.nn.modules import Conv
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    torch.manual_seed(8)
    for k, g in ((1, 1), (3, 16)):
        wrapper = Conv(16, 16 if g > 1 else 24, k, 1, g=g)
        wrapper.conv = cls(wrapper.conv)
        _randomise_bn(wrapper)
        wrapper.eval()
        x = torch.randn(2, 16, 7, 7) * 2
        with torch.no_grad():
            before = wrapper(x)
        weight_before = wrapper.conv.weight.detach().clone()
        wrapper.conv = fuse_conv_and_bn(wrapper.conv, wrapper.bn)
        delattr(wrapper, "bn")
        wrapper.forward = wrapper.forward_fuse
        assert type(wrapper.conv).__name__ == cls.__name__  # still BitLinear: LayerNorm and activation quantisation kept
        with torch.no_grad():
            after = wrapper(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert torch.equal(wrapper.conv.weight.detach(), weight_before)  # ternary weight unchanged
        assert not torch.allclose(wrapper.conv.out_scale, torch.ones_like(wrapper.conv.out_scale))


def test_fold_rejects_a_weight_that_is_not_a_rescale():
    q = BitLinear_TTQ(hand_conv())
    w = q.weight.detach()
    torch.testing.assert_close(channel_fold_scale(w * torch.tensor([2.0, -3.0]).view(2, 1, 1, 1), w),
                               torch.tensor([2.0, -3.0]))
    zero_row = torch.zeros_like(w)
    zero_row[1] = w[1]
    assert channel_fold_scale(zero_row * 4, zero_row).tolist() == [1.0, 4.0]  # all-zero channel: scale 1
    with pytest.raises(ValueError, match="per-output-channel rescale"):
        q.weight = torch.randn_like(w)


@pytest.fixture(scope="module")
def fused_pair(yolo11n):
    """(eval model with BitLinear_TTQ in C2PSA, the same model fused), BatchNorm statistics randomised."""
    model = copy.deepcopy(yolo11n)
    replace_c2psa(model, "bitlinear_ttq")
    _randomise_bn(model)
    model.eval()
    return model, copy.deepcopy(model).fuse(verbose=False)


def test_fused_model_equals_unfused(fused_pair):
    model, fused = fused_pair
    assert sum(isinstance(m, L.BitLinear_TTQ) for m in fused.modules()) == 5
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x)[0], fused(x)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------ ONNX
def test_onnx_runtime_reproduces_pytorch(fused_pair, tmp_path):
    """Each BitLinear layer alone: identical activation codes and outputs within 1e-5. The whole fused model
    (torch.onnx.export, TorchScript exporter as Ultralytics uses it, opset 17): within rtol 1e-4, atol 1e-3."""
    import onnxruntime as ort
    from ultralytics.nn.modules import Detect

    _, fused = fused_pair
    x = torch.rand(2, 3, 128, 128)
    inputs = {}
    layers = c2psa_convs(fused)
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: inputs.__setitem__(p, i[0])) for p, m in layers.items()]
    with torch.no_grad():
        fused(x)
    for h in hooks:
        h.remove()

    class WithCodes(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, t):
            return self.layer(t), self.layer.activation_codes(t)[0]

    def run_onnx(module, arg, path):
        torch.onnx.export(module, (arg,), str(path), dynamo=False, opset_version=17, input_names=["x"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": arg.numpy()})

    for i, (path, layer) in enumerate(layers.items()):
        y_ort, codes_ort = run_onnx(WithCodes(layer), inputs[path], tmp_path / f"layer{i}.onnx")
        with torch.no_grad():
            y, codes = WithCodes(layer)(inputs[path])
        assert np.array_equal(codes_ort, codes.numpy()), path
        np.testing.assert_allclose(y_ort, y.numpy(), rtol=1e-5, atol=1e-5)

    model = copy.deepcopy(fused)
    for m in model.modules():
        if isinstance(m, Detect):
            m.export, m.format = True, "onnx"
    with torch.no_grad():
        y = model(x)
    y = (y[0] if isinstance(y, (list, tuple)) else y).numpy()
    (y_ort,) = run_onnx(model, x, tmp_path / "model.onnx")[:1]
    np.testing.assert_allclose(y_ort, y, rtol=1e-4, atol=1e-3)


def test_ultralytics_onnx_export_of_a_bitlinear_checkpoint(shared_weights, shared_data, tmp_path):
    """Ultralytics' exporter on pretrained yolo11n with BitLinear_TTQ in C2PSA, real images: class scores within
    1e-3 and boxes of the detections (score > 0.25) within 0.5 px of PyTorch. Elsewhere a box may move further: an
    activation code one step off (a rounding tie resolved differently after float differences upstream) shifts
    the flat box distributions of low-score anchors."""
    import cv2
    import onnxruntime as ort
    from ultralytics import YOLO

    from yolo_tq.io import load_model, save_stock_checkpoint

    model, ckpt = load_model(shared_weights)
    replace_c2psa(model, "bitlinear_ttq")
    path = save_stock_checkpoint(model, tmp_path / "bitlinear.pt", train_args=ckpt.get("train_args"))
    onnx_path = YOLO(str(path)).export(format="onnx", imgsz=320, opset=17, simplify=False, verbose=False)
    ref, _ = load_model(path)
    ref = ref.fuse(verbose=False).eval()
    images = sorted((shared_data.parent / "images").rglob("*.jpg"))[:2]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for p in images:
        x = torch.from_numpy(cv2.resize(cv2.imread(str(p)), (320, 320))[:, :, ::-1].copy()).permute(2, 0, 1)
        x = (x.float() / 255)[None]
        (y_ort,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            y = ref(x)[0].numpy()
        np.testing.assert_allclose(y_ort[:, 4:], y[:, 4:], atol=1e-3)
        detected = y[0, 4:].max(0) > 0.25
        assert detected.any()
        assert np.abs(y_ort[0, :4, detected] - y[0, :4, detected]).max() < 0.5


# ------------------------------------------------------------------------------------------ checkpoints, training
ROOT_SCRIPTS = {"test": "layers", "validate": "val", "compare_bitlinear": "compare", "train_c2psa": "c2psa",
                "train_c2psa_standard": "c2psa-standard", "train": "train"}


def run_script(module: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a root script's command in this process, as its shim does: (exit code, stdout, stderr)."""
    from yolo_tq.cli import script

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        script(ROOT_SCRIPTS[module], args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _c2psa_config(tmp, weights, data, mode):
    from yolo_tq.config import load_config

    name = "stage2_c2psa.yaml" if mode == "bitlinear_ttq" else "stage2_c2psa_standard.yaml"
    return load_config(REPO / "configs" / name,
                       {"weights": str(weights), "data": str(data), "checkpoint_dir": str(tmp / "ckpt"),
                        "epochs": 1, "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu"},
                       ["train.plots=false", "train.ultralytics.nbs=4"])


def test_configs_hold_the_plan_defaults():
    from yolo_tq.config import load_config

    for name, mode in (("stage2_c2psa.yaml", "bitlinear_ttq"), ("stage2_c2psa_standard.yaml", "bitlinear_standard")):
        cfg = load_config(REPO / "configs" / name)
        (stage,) = cfg.stages
        assert (stage.c2psa, stage.layers, stage.threshold) == (mode, [], 0.7)
        t = cfg.train
        assert (t.epochs, t.batch, t.imgsz, t.lr0, t.weight_decay) == (50, 8, 640, 1e-4, 5e-4)
        assert (cfg.quantization.act_bits, cfg.base.data) == (8, "coco.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    """One epoch of each mode: BitLinear_TTQ from a checkpoint that already holds TTQ layers (as a stage output
    does), standard BitLinear from the FP checkpoint."""
    from yolo_tq.io import load_model, save_stock_checkpoint
    from yolo_tq.train.stages import train_stages

    tmp = tmp_path_factory.mktemp("c2psa")
    model, _ = load_model(tiny_fp_checkpoint)
    ttq_paths = install_stage(model, StagePlan("s", (2, 3)))
    ttq_start = save_stock_checkpoint(model, tmp / "ttq_start.pt")
    out = {}
    for mode, start in (("bitlinear_ttq", ttq_start), ("bitlinear_standard", tiny_fp_checkpoint)):
        cfg = _c2psa_config(tmp, tiny_fp_checkpoint, tiny_data, mode)
        out[mode] = train_stages(cfg, [1], start=str(start))[0]
    return out, ttq_paths


def test_training_checkpoints_hold_bitlinear_and_earlier_ttq_layers(trained, tiny_fp_checkpoint):
    from yolo_tq.io import load_model

    out, ttq_paths = trained
    for mode, cls in (("bitlinear_ttq", L.BitLinear_TTQ), ("bitlinear_standard", L.BitLinear_Standard)):
        for key in ("best", "last", "ternary"):
            model, ckpt = load_model(out[mode][key])
            q = quantized_modules(model)
            bit = {p for p, m in q.items() if isinstance(m, cls)}
            assert bit == set(c2psa_convs(model)) and len(bit) == 5, (mode, key)
            if mode == "bitlinear_ttq" and key != "ternary":
                assert all(isinstance(q[p], TTQConv2d) for p in ttq_paths)
            if mode == "bitlinear_ttq" and key == "ternary":  # TTQ convs exported plain, still three values
                assert all(type(model.get_submodule(p)) is nn.Conv2d for p in ttq_paths)
                assert all(ternary_values(model.get_submodule(p).weight) is not None for p in ttq_paths)
    fp, _ = load_model(tiny_fp_checkpoint)
    best, _ = load_model(out["bitlinear_ttq"]["best"])
    moved = [not torch.equal(best.get_submodule(p).latent_weight, fp.get_submodule(p).weight.float())
             for p in c2psa_convs(best)]
    assert all(moved)  # the latent weights were trained


def test_checkpoint_round_trip_rebuilds_bitlinear(trained):
    """What resume and stage chaining do: a fresh model, the checkpoint's quantized modules replicated at the
    same paths with the same settings, its weights loaded: the same outputs."""
    from yolo_tq.io import load_model

    out, _ = trained
    model, _ = load_model(out["bitlinear_ttq"]["last"])
    fresh = build_model("yolo11n.yaml", nc=2)
    done = install_like(fresh, model)
    assert {p for p in done if isinstance(fresh.get_submodule(p), L.BitLinear_TTQ)} == set(c2psa_convs(model))
    fresh.load_state_dict(model.state_dict())
    for p in c2psa_convs(model):
        assert fresh.get_submodule(p).spec == model.get_submodule(p).spec
    fresh.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], model(x)[0])


def test_validate_and_report_handle_bitlinear_checkpoints(trained, tiny_data, monkeypatch, capsys):
    from yolo_tq.io import load_model
    from yolo_tq.eval.validate import validate
    from yolo_tq.eval.layers import conv_rows

    out, _ = trained
    m = validate(out["bitlinear_standard"]["ternary"], str(tiny_data), imgsz=64, batch=4, device="cpu")
    assert set(m) >= {"mAP50", "mAP50-95", "precision", "recall"}
    model, _ = load_model(out["bitlinear_ttq"]["best"])
    rows = {r["path"]: r for r in conv_rows(model)}
    for p in c2psa_convs(model):
        assert rows[p]["ternary"] and rows[p]["act_bits"] == 8 and rows[p]["module"] == "BitLinear_TTQ"
    code, stdout, stderr = run_script("test", [out["bitlinear_ttq"]["best"], "--only-ternary"], monkeypatch, capsys)
    assert code == 0, stderr
    lines = [ln for ln in stdout.splitlines() if "BitLinear_TTQ" in ln]
    assert len(lines) == 5 and all(ln.split()[-1] == "8" for ln in lines)


def test_compare_bitlinear_table(trained, tiny_fp_checkpoint, tiny_data, tmp_path, monkeypatch, capsys):
    import csv
    import json

    out, _ = trained
    code, stdout, stderr = run_script(
        "compare_bitlinear", ["--baseline", str(tiny_fp_checkpoint), "--ttq", out["bitlinear_ttq"]["ternary"],
                              "--standard", out["bitlinear_standard"]["ternary"], "--data", str(tiny_data),
                              "--imgsz", "64", "--batch", "4", "--device", "cpu", "--json", str(tmp_path / "t.json"),
                              "--csv", str(tmp_path / "t.csv")], monkeypatch, capsys)
    assert code == 0, stderr
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [x["model"] for x in rows] == ["baseline", "BitLinear_TTQ", "standard BitLinear"]
    with open(tmp_path / "t.csv") as f:
        assert [x["model"] for x in csv.DictReader(f)] == [x["model"] for x in rows]
    base, ttq, std = rows
    assert base["ternary_params"] == 0 and base["compression"] == pytest.approx(1.0)
    c2psa_weights = 256 * 128 + 128 * 128 + 128 * 9 + 256 * 128 + 128 * 256  # qkv, proj, pe (dw 3x3), ffn.0, ffn.1
    assert std["ternary_params"] == c2psa_weights and std["bitlinear_layers"] == 5
    assert ttq["ternary_params"] > c2psa_weights  # and the TTQ layers of the start checkpoint
    assert std["params"] == base["params"] + 2 * (4 * 128 + 256)  # + the LayerNorms (ffn.1 reads 256 channels)
    assert 1.0 < std["compression"] < ttq["compression"]
    for x in rows:
        assert 0 <= x["mAP50-95"] <= x["mAP50"] <= 1 and x["file_mb"] > 0
    assert "BitLinear_TTQ" in stdout and "compression" in stdout


def test_train_c2psa_cli_errors(tmp_path, monkeypatch, capsys):
    for script in ("train_c2psa", "train_c2psa_standard"):
        code, _, err = run_script(script, ["--model", str(tmp_path / "missing.pt")], monkeypatch, capsys)
        assert code == 2 and err.startswith("error:") and "missing.pt" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "no_c2psa.yaml"
    cfg.write_text(textwrap.dedent("""
        stages:
          - {name: s, layers: [2]}
        """))
    code, _, err = run_script("train_c2psa", ["--config", str(cfg)], monkeypatch, capsys)
    assert code == 2 and "c2psa" in err


def test_restore_token_stats_is_a_config_key():
    """quantization.restore_token_stats reaches the C2PSA spec (on by default; off is the original's normalisation)."""
    from yolo_tq.config import load_config, stage_plan

    root = Path(__file__).resolve().parents[1]
    for dotlist, expected in (([], True), (["quantization.restore_token_stats=false"], False)):
        cfg = load_config(root / "configs" / "stage2_c2psa.yaml", None, dotlist)
        assert stage_plan(cfg, cfg.stages[0]).c2psa.restore_token_stats is expected


def test_c2psa_blocks_first_replaces_only_the_first_psablock():
    """yolo11x's C2PSA holds two PSABlocks: `c2psa_blocks: first` (the original's choice) replaces m[0] only."""
    from yolo_tq.config import load_config, stage_plan

    model = build_model("yolo11x.yaml")
    every, first = c2psa_convs(model), c2psa_convs(model, first_block_only=True)
    assert len(every) == 10 and len(first) == 5 and set(first) < set(every)
    assert all(".m.0." in p for p in first)
    cfg = load_config(REPO / "configs/original/stage2_c2psa.yaml")
    plan = stage_plan(cfg, cfg.stages[0])
    assert plan.c2psa_blocks == "first"
    assert set(install_stage(model, plan)) == set(first)
    assert load_config(REPO / "configs/stage2_c2psa.yaml").stages[0].c2psa_blocks == "all"
    with pytest.raises(Exception, match="c2psa_blocks must be one of all, first"):
        load_config(REPO / "configs/stage2_c2psa.yaml", dotlist=["stages[0].c2psa_blocks=second"])
