"""TTQ / BitNet math against hand-worked values and the paper's gradient formulas."""

import pytest
import torch

from yolo_tq.quant.ternary import (
    TTQTernarize,
    absmax_quantize,
    absmean_ternarize,
    initial_scales,
    threshold_grad,
    ternary_masks,
    ternary_threshold,
    ttq_scale_grads,
    ttq_ternarize,
)

W = torch.tensor([[0.9, -0.2, 0.05], [-0.6, 0.3, -0.01]])  # mean|w| = 2.06/6, max|w| = 0.9


def test_threshold_rules():
    assert ternary_threshold(W, 0.7, "mean").item() == pytest.approx(0.7 * 2.06 / 6)
    assert ternary_threshold(W, 0.5, "max").item() == pytest.approx(0.45)
    with pytest.raises(ValueError, match="threshold rule"):
        ternary_threshold(W, 0.7, "median")


def test_forward_hand_worked():
    # Δ = 0.7 * 0.34333 = 0.24033: positives {0.9, 0.3}, negatives {-0.6}, zeros {-0.2, 0.05, -0.01}
    out = ttq_ternarize(W, torch.tensor(2.0), torch.tensor(3.0), 0.7, "mean")
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 0.0], [-3.0, 2.0, 0.0]]))
    # max rule, t = 0.5: Δ = 0.45 → only 0.9 and -0.6 survive
    out = ttq_ternarize(W, torch.tensor(1.0), torch.tensor(1.0), 0.5, "max")
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_initial_scales_are_set_means():
    delta = ternary_threshold(W, 0.7, "mean")
    wp, wn = initial_scales(W, delta)
    assert wp.item() == pytest.approx((0.9 + 0.3) / 2)
    assert wn.item() == pytest.approx(0.6)
    wp_c, wn_c = initial_scales(W, delta, per_channel=True)
    assert wp_c.shape == (2, 1)
    assert wp_c.flatten().tolist() == pytest.approx([0.9, 0.3])
    assert wn_c.flatten()[0].item() == pytest.approx(delta.item())  # channel 0 has no negative: falls back to Δ
    assert wn_c.flatten()[1].item() == pytest.approx(0.6)


def test_backward_matches_paper_formulas():
    w = W.clone().requires_grad_(True)
    wp = torch.tensor(2.0, requires_grad=True)
    wn = torch.tensor(3.0, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (ttq_ternarize(w, wp, wn, 0.7, "mean") * g).sum().backward()
    # dL/dWp = Σ_{w>Δ} g = 1 + 5 ; dL/dWn = -Σ_{w<-Δ} g = -4
    assert wp.grad.item() == pytest.approx(6.0)
    assert wn.grad.item() == pytest.approx(-4.0)
    # latent: Wp·g on positives, g on zeros, Wn·g on negatives
    assert torch.allclose(w.grad, torch.tensor([[2.0 * 1, 2.0, 3.0], [3.0 * 4, 2.0 * 5, 6.0]]))


def test_normalized_scale_gradient():
    pos, neg = ternary_masks(W, torch.tensor(0.24))
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    gp, gn = ttq_scale_grads(g, pos, neg, torch.tensor(2.0), torch.tensor(3.0), "normalized")
    assert gp.item() == pytest.approx(min(((1 + 5) / 2) / 2.0, 1.0))  # mean 3 / Wp 2 = 1.5 → clipped to 1
    assert gn.item() == pytest.approx(max((-4 / 1) / 3.0, -1.0))  # -4/3 → clipped to -1
    gp, gn = ttq_scale_grads(g * 0.1, pos, neg, torch.tensor(2.0), torch.tensor(3.0), "normalized")
    assert gp.item() == pytest.approx(0.15)
    assert gn.item() == pytest.approx(-0.4 / 3.0)


def test_gradcheck_scales():
    """The forward is linear in Wp and Wn, so autograd's numerical check applies to them exactly."""
    w = torch.randn(4, 3, 3, 3, dtype=torch.double)
    delta = ternary_threshold(w, 0.7, "mean")
    for shape in ((), (4, 1, 1, 1)):
        wp = torch.rand(shape, dtype=torch.double).add_(0.5).requires_grad_(True)
        wn = torch.rand(shape, dtype=torch.double).add_(0.5).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: TTQTernarize.apply(w, a, b, delta, "paper"), (wp, wn))


def test_per_channel_scale_grads_sum_per_channel():
    w = torch.tensor([[[[1.0]], [[-1.0]]], [[[1.0]], [[0.0]]]])  # (2,2,1,1)
    wp = torch.ones(2, 1, 1, 1, requires_grad=True)
    wn = torch.ones(2, 1, 1, 1, requires_grad=True)
    out = TTQTernarize.apply(w, wp, wn, torch.tensor(0.5), "paper")
    (out * torch.arange(1.0, 5.0).view(2, 2, 1, 1)).sum().backward()
    assert wp.grad.flatten().tolist() == [1.0, 3.0]
    assert wn.grad.flatten().tolist() == [-2.0, 0.0]


def test_threshold_grad_is_the_windowed_central_difference():
    """For a loss linear in w_t, threshold_grad equals (L(Δ+h) − L(Δ−h)) / 2h exactly (h = window·Δ)."""
    w = torch.tensor([0.50, 0.55, 0.62, 0.30, -0.47, -0.56, -0.9, 0.0])
    g = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    wp, wn, delta, window = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5), 0.2  # h = 0.1
    loss = lambda d: (TTQTernarize.apply(w, wp, wn, torch.tensor(d), "paper") * g).sum()
    central = (loss(0.6) - loss(0.4)) / 0.2
    # by hand: the window (0.4, 0.6) holds 0.50, 0.55 (+Wp -> 0: -2·(1+2)) and -0.47, -0.56 (-Wn -> 0: +3·(16+32))
    assert central.item() == pytest.approx((-2 * 3 + 3 * 48) / 0.2)
    assert threshold_grad(g, w, delta, wp, wn, window).item() == pytest.approx(central.item())


def test_learned_threshold_gets_a_gradient_and_moves_delta():
    w = W.clone()
    factor = torch.tensor(0.6, requires_grad=True)  # Δ = 0.206, h = 0.0206: only -0.2 lies in a window
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (ttq_ternarize(w, torch.tensor(2.0), torch.tensor(3.0), factor, "mean") * g).sum().backward()
    delta = 0.6 * W.abs().mean()
    by_hand = 3.0 * 2.0 / (2 * 0.1 * delta) * W.abs().mean()  # +Wn·g(-0.2) / 2h, times dΔ/dt = mean|w|
    assert factor.grad.item() == pytest.approx(by_hand.item(), rel=1e-5) and factor.grad.item() > 0
    fixed = torch.tensor(0.7)  # a plain (buffer) factor: no gradient path, results as before
    assert not ttq_ternarize(w, torch.tensor(2.0), torch.tensor(3.0), fixed, "mean").requires_grad


def test_per_channel_threshold_hand_worked():
    # row 0: mean|w| = 1.15/3, Δ0 = 0.7·0.38333 = 0.26833 -> [+, 0, 0]; row 1: mean|w| = 0.91/3, Δ1 = 0.21233 ->
    # [-, +, 0]. The per-layer Δ (0.24033) gives the same codes here; the rows below it do not.
    delta = ternary_threshold(W, 0.7, "mean", per_channel=True)
    assert delta.shape == (2, 1)
    assert delta.flatten().tolist() == pytest.approx([0.7 * 1.15 / 3, 0.7 * 0.91 / 3])
    small = torch.tensor([[0.9, -0.8, 0.7], [0.03, -0.02, 0.005]])  # row 1 is ~30x smaller than row 0
    layer = ttq_ternarize(small, torch.tensor(1.0), torch.tensor(1.0), 0.7, "mean")
    channel = ttq_ternarize(small, torch.tensor(1.0), torch.tensor(1.0), 0.7, "mean", per_channel_threshold=True)
    assert torch.equal(layer[1], torch.zeros(3))  # the layer's Δ (0.287) zeroes the whole small channel
    assert torch.equal(channel, torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, 0.0]]))  # Δ1 = 0.7·0.055/3 = 0.0128
    assert ternary_threshold(W, 0.5, "max", per_channel=True).flatten().tolist() == pytest.approx([0.45, 0.3])
    wp, wn = initial_scales(small, ternary_threshold(small, 0.7, "mean", per_channel=True))
    assert wp.shape == () and wp.item() == pytest.approx((0.9 + 0.7 + 0.03) / 3)  # one scale per layer still


def test_per_channel_learned_threshold_gradient_is_the_sum_of_the_channels():
    factor = torch.tensor(0.55, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (ttq_ternarize(W, torch.tensor(2.0), torch.tensor(3.0), factor, "mean", per_channel_threshold=True) * g
     ).sum().backward()
    m = W.abs().mean(dim=1)  # per-channel mean|w|: [0.38333, 0.30333]
    delta = 0.55 * m  # [0.2108, 0.1668]; windows ±0.1·Δ: row 0 holds -0.2 (0.011 from -Δ0), row 1 nothing
    by_hand = 3.0 * 2.0 / (2 * 0.1 * delta[0]) * m[0]  # +Wn·g(-0.2) / 2h0, times dΔ0/dt
    assert factor.grad.item() == pytest.approx(by_hand.item(), rel=1e-5)
    per_channel = threshold_grad(g, W, delta.view(2, 1), torch.tensor(2.0), torch.tensor(3.0))
    assert per_channel.shape == (2, 1) and per_channel[1].item() == 0.0


def test_absmean_ternarize_and_ste():
    w = torch.tensor([0.4, -0.1, 0.05, -0.9], requires_grad=True)  # β = 0.3625
    q = absmean_ternarize(w)
    beta = 1.45 / 4
    assert torch.allclose(q, torch.tensor([beta, 0.0, 0.0, -beta]))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones(4))  # straight-through


def test_absmax_quantize_codes_and_ste():
    x = torch.tensor([[[[1.0]], [[-0.5]], [[0.25]]]], requires_grad=True)  # one token with 3 channels
    codes, gamma = absmax_quantize(x, bits=8, per_token=True, dim=1)
    assert gamma.flatten().item() == 1.0
    assert codes.flatten().tolist() == [127.0, -64.0, 32.0]  # round(-63.5) = -64 (half to even), round(31.75) = 32
    assert codes.min() >= -128 and codes.max() <= 127
    codes.sum().backward()
    assert torch.allclose(x.grad.flatten(), torch.full((3,), 127.0))  # STE: d(x·127/γ)/dx with γ detached
