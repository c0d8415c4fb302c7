"""1-bit weights (Eq. 5-6) and quantized layers against hand computation and float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bestformer
from bestformer.errors import ConfigError
from bestformer.quant import (
    BinaryConv1d,
    BinaryConv2d,
    BinaryLinear,
    LSQQuantizer,
    QuantConv2d,
    QuantLinear,
    SignBinarizer,
    bits_to_quantizer,
    get_weight_quantizer,
    straight_through,
    weight_bits_of,
)
from bestformer.quant.ste import MultiLevelSTE, TernarySTE, ste_floor, ste_round, ste_sign


def test_binary_weights_are_exactly_pm1_and_zero_maps_to_plus_one() -> None:
    w = torch.tensor([[-1.0, 0.0, 1.0], [3.0, 5.0, 7.0]])  # standardized rows: [-1, 0, 1] and [-1, 0, 1]
    b = SignBinarizer()(w)
    assert b.tolist() == [[-1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]
    layer = BinaryConv2d(4, 6, 3)
    assert set(layer.quantized_weight().unique().tolist()) == {-1.0, 1.0}


def test_one_weight_per_channel_binarizes_to_plus_one_without_nan() -> None:
    # Eq. 5 with one weight: W^ = W - mean(W) = 0, so Eq. 6 gives +1; an unbiased std of one value is NaN.
    w = torch.tensor([[-2.0], [0.5], [3.0]], requires_grad=True)
    b = SignBinarizer()(w)
    assert b.tolist() == [[1.0], [1.0], [1.0]]
    b.sum().backward()
    assert w.grad.tolist() == [[0.0], [0.0], [0.0]]  # W^ does not depend on W
    layer = BinaryLinear(1, 3)
    assert torch.isfinite(layer(torch.randn(2, 1))).all()


def test_latent_standardization_per_output_channel() -> None:
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 1.5
    std = SignBinarizer(eps=0).standardize(w)
    flat = std.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(flat.std(1), torch.ones(8, dtype=torch.float64), atol=1e-12)  # unbiased, as the reference


def test_straight_through_gradient_reaches_latent_weights() -> None:
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    (SignBinarizer(eps=0)(w) * g).sum().backward()
    # independent path: identity STE means d/dW of <standardize(W), g>
    w2 = w.detach().clone().requires_grad_(True)
    flat = w2 - w2.mean(1, keepdim=True)
    (flat / flat.std(1, keepdim=True) * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-12)
    assert bool((w.grad != 0).all())


def test_layers_report_their_bit_width() -> None:
    assert BinaryLinear(4, 3).weight_bits == 1
    assert BinaryConv1d(4, 3, 1).weight_bits == 1
    assert BinaryConv2d(4, 3, 3).weight_bits == 1
    assert QuantLinear(4, 3).weight_bits == 32
    assert QuantConv2d(4, 3, 3, weight_quantizer="lsq4").weight_bits == 4
    assert weight_bits_of(nn.Linear(2, 2)) == 32
    assert weight_bits_of(nn.BatchNorm1d(2)) is None


def test_unquantized_layers_equal_torch_layers() -> None:
    x = torch.randn(3, 5, 6, 6)
    conv, ref = QuantConv2d(5, 4, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), ref(x))
    lin, ref_lin = QuantLinear(5, 2), nn.Linear(5, 2)
    ref_lin.load_state_dict(lin.state_dict())
    assert torch.equal(lin(x[:, :, 0, 0]), ref_lin(x[:, :, 0, 0]))


def test_binary_linear_equals_matmul_with_signs() -> None:
    lin = BinaryLinear(16, 4)
    x = (torch.rand(10, 16) > 0.5).float()
    signs = torch.where(SignBinarizer().standardize(lin.weight) >= 0, 1.0, -1.0)
    assert torch.equal(lin(x), x @ signs.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_levels_codes_and_init(bits: int) -> None:
    w = torch.randn(6, 32)
    q = LSQQuantizer(bits, weight=w)
    qp = 2 ** (bits - 1) - 1
    assert torch.allclose(q.step, (2 * w.abs().mean() / qp**0.5).expand(6))  # the authors': layer-wide
    assert torch.allclose(LSQQuantizer(bits, weight=w, per_channel_init=True).step, 2 * w.abs().mean(1) / qp**0.5)
    wq = q(w)
    step = q.step.detach()[:, None]  # W_q = clamp(round(W / s), -Qn, Qp) s, computed here independently
    assert torch.allclose(wq, torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), qp) * step)
    codes, scale = q.codes(w)
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= qp
    assert torch.allclose(codes.float() * scale[:, None], wq)


def test_lsq_initialisation_by_hand() -> None:
    w = torch.tensor([[1.0, -1.0], [3.0, -3.0]])  # mean |W| = 2; per channel 1 and 3; Qp = 7 at 4 bits
    layer, channel = get_weight_quantizer("lsq4", w), get_weight_quantizer("lsq4c", w)
    assert torch.allclose(layer.step, torch.tensor([4.0, 4.0]) / 7**0.5)
    assert torch.allclose(channel.step, torch.tensor([2.0, 6.0]) / 7**0.5)
    assert (layer.alias, channel.alias) == ("lsq4", "lsq4c") and get_weight_quantizer(4, w).per_channel_init is False
    model = bestformer.create_model("qsd_tiny", weight_bits="lsq4c")
    assert model.stages[1][0].conv.conv.weight_quantizer.per_channel_init


def test_lsq_step_gradient_scale() -> None:
    w = torch.randn(3, 10)
    q = LSQQuantizer(4, weight=w)
    q(w).sum().backward()
    g_scaled = q.step.grad.clone()
    # the same gradient without LSQ's scale factor 1 / sqrt(numel * Qp)
    s = q.step.detach().clone().requires_grad_(True)
    x = torch.clamp(w / s[:, None], -8, 7)
    (((torch.round(x) - x).detach() + x) * s[:, None]).sum().backward()
    assert torch.allclose(g_scaled, s.grad / (w.numel() * 7) ** 0.5, atol=1e-6)


def test_bad_quantizer_specs() -> None:
    with pytest.raises(ConfigError, match="2 to 8"):
        LSQQuantizer(9, out_channels=3)
    with pytest.raises(ConfigError, match="unknown weight quantizer"):
        get_weight_quantizer("ternary")
    with pytest.raises(ConfigError, match="weight bits"):
        get_weight_quantizer(12)
    assert get_weight_quantizer(32) is None


def test_straight_through_estimators_forward_their_value_and_backward_their_proxy() -> None:
    x = torch.tensor([-1.5, -0.2, 0.0, 0.4, 0.6, 2.5], requires_grad=True)
    assert torch.equal(ste_round(x), torch.round(x)) and torch.equal(ste_floor(x), torch.floor(x))
    assert ste_sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]  # Eq. 6: 0 -> +1
    (g,) = torch.autograd.grad(ste_round(x).sum(), x)
    assert torch.equal(g, torch.ones(6))  # identity gradient
    levels = MultiLevelSTE(4)(x)  # floor(4 clamp(x, 0, 1) + 1/2) / 4, gradient of clamp(x, 0, 1)
    assert levels.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0]
    (g,) = torch.autograd.grad(levels.sum(), x)
    assert g.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    tern = TernarySTE(v_threshold=2.0, theta=0.5)(x)
    assert tern.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    (g,) = torch.autograd.grad(tern.sum(), x)
    assert g.tolist() == [0.5, 0.5, 0.5, 0.5, 0.5, 0.0]  # 1 / V_th inside [-V_th, V_th]
    y = straight_through(torch.zeros(6), 3 * x)
    assert torch.equal(y, torch.zeros(6)) and torch.equal(torch.autograd.grad(y.sum(), x)[0], torch.full((6,), 3.0))


def test_bits_to_quantizer_maps_full_precision_to_none() -> None:
    assert [bits_to_quantizer(b) for b in (None, 16, 32, 1, 4, "lsq4", "binary")] == [None, None, None, 1, 4, "lsq4",
                                                                                     "binary"]
