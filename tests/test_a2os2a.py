"""A2OS2A: the ternary neuron against hand computation, the attention evaluated with additions and
subtractions only, the attention option in every SpikingTransformer family, and the registered models."""

from __future__ import annotations

import pytest
import torch

import bestformer
from bestformer.errors import ConfigError, InputError
from bestformer.layers import A2OS2A, merge_heads
from bestformer.neurons import LIF, Sigmoid, TernaryNeuron, get_neuron, is_spiking_neuron, ternary_multistep
from bestformer.neurons.ternary import TernaryParameters

# ------------------------------------------------------------------------------------------ ternary neuron


def test_ternary_spike_trajectory_and_ste_gradient_by_hand() -> None:
    # u <- 0.25 u + x; fire sign(u) where |u| >= 0.5; hard reset.
    # row 0: u = 0.3, 0.375, -0.60625 (fires -1, reset), 2.0 (fires +1)
    # row 1: u = 0.5 (fires +1, reset), -0.4, -0.3, 0.025
    x = torch.tensor([[0.3, 0.5], [0.3, -0.4], [-0.7, -0.2], [2.0, 0.1]], dtype=torch.float64, requires_grad=True)
    s = TernaryNeuron()(x)
    assert s.tolist() == [[0, 1], [0, 0], [-1, 0], [1, 0]]
    s.sum().backward()
    # STE: ds/du = 1[|u| <= 1]; du_t/du_{t-1} = 0.25 (1 - |s_{t-1}|), reset detached.
    # row 0 backwards: t3 |u|=2 -> 0; t2 -> 1; t1 -> 1 + 0.25 * 1 (t2 spiked: no carry beyond) = 1.25;
    # t0 -> 1 + 0.25 * 1.25 = 1.3125.
    # row 1: t3 -> 1; t2 -> 1 + 0.25; t1 -> 1 + 0.25 * 1.25; t0 spiked -> 1.
    assert torch.allclose(x.grad[:, 0], torch.tensor([1.3125, 1.25, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(x.grad[:, 1], torch.tensor([1.0, 1.3125, 1.25, 1.0], dtype=torch.float64))


def test_ternary_lif_variant_trajectory_and_surrogate_gradient() -> None:
    # H = V + (X - V) / 2 with thresholds +-1: 0.75 (no spike), -1.125 (fires -1, reset), 0.2, 0.3
    x = torch.tensor([1.5, -3.0, 0.4, 0.4], dtype=torch.float64).view(4, 1)
    assert TernaryNeuron("lif")(x).flatten().tolist() == [0, -1, 0, 0]
    # one step from rest: h = x / 2 and ds/dh = g'(h - 1) + g'(-h - 1), g the sigmoid surrogate (alpha 4)
    x1 = torch.linspace(-4, 4, 17, dtype=torch.float64).view(1, -1).requires_grad_()
    TernaryNeuron("lif")(x1).sum().backward()
    h = x1.detach() / 2
    expected = 0.5 * (Sigmoid().derivative(h - 1) + Sigmoid().derivative(-h - 1))
    assert torch.allclose(x1.grad, expected)


def test_ternary_module_equals_functional_and_amplitude_learns() -> None:
    x = torch.randn(5, 3, 7)
    neuron = TernaryNeuron(learnable_amplitude=True)
    out, state = neuron(x, return_state=True)
    ref, ref_state = ternary_multistep(x, TernaryParameters(), neuron.surrogate)
    assert torch.equal(out, ref) and torch.equal(state.v, ref_state.v)
    assert set(out.unique().tolist()) <= {-1.0, 0.0, 1.0}
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    assert torch.allclose(neuron.amplitude.grad, (ref * grad).sum())  # d(a s)/da = s


def test_ternary_soft_reset_and_errors() -> None:
    # soft reset subtracts the firing level theta = 0.5 V_th: u = 0.8 -> +1, 0.3 left; 0.075 + 0.3 -> 0
    assert TernaryNeuron(reset="soft")(torch.tensor([[0.8], [0.3]])).flatten().tolist() == [1, 0]
    with pytest.raises(ConfigError, match="variant"):
        TernaryNeuron("binary")
    with pytest.raises(ConfigError, match="surrogate"):
        TernaryNeuron("ternary_spike", surrogate="atan")
    with pytest.raises(ConfigError, match="v_threshold must be finite and above v_reset=0.0, got 0.0"):
        TernaryNeuron(v_threshold=0.0)
    with pytest.raises(InputError):
        TernaryNeuron()(torch.ones(3))
    assert isinstance(get_neuron("ternary")(), TernaryNeuron)


@pytest.mark.parametrize("family", ["spikformer_tiny", "bestformer_tiny"])
def test_ternary_as_the_model_neuron(family: str) -> None:
    # the registry path: every neuron of the model is ternary, with the LIF-style options the blocks pass
    model = bestformer.create_model(family, neuron="ternary", img_size=8, embed_dim=16, num_heads=2)
    neurons = [m for m in model.modules() if is_spiking_neuron(m)]
    assert len(neurons) >= 8 and all(isinstance(m, TernaryNeuron) for m in neurons), neurons
    assert any(m.params.v_threshold == 0.5 for m in neurons)  # the attention map's neuron keeps its threshold
    out = model(torch.randn(2, 1, 8, 8))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------- attention


def _addition_only_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(Q K^T) V`` with additions and subtractions only: Q selects entries of K, V's sign selects +-."""
    t_, b_, h_, n, d = q.shape
    out = torch.zeros(t_, b_, h_, n, d, dtype=torch.float64)
    for t in range(t_):
        for b in range(b_):
            for h in range(h_):
                qa, ka, va = q[t, b, h], k[t, b, h], v[t, b, h]
                attn = torch.zeros(n, n, dtype=torch.float64)
                for i in range(n):
                    for j in range(n):
                        acc = 0.0
                        for c in range(d):
                            if qa[i, c] == 1:
                                acc += float(ka[j, c])
                        attn[i, j] = acc
                for i in range(n):
                    for c in range(d):
                        acc = 0.0
                        for j in range(n):
                            if va[j, c] == 1:
                                acc += float(attn[i, j])
                            elif va[j, c] == -1:
                                acc -= float(attn[i, j])
                        out[t, b, h, i, c] = acc
    return out


def test_attention_is_addition_only() -> None:
    layer = A2OS2A(dim=8, heads=2, neuron_layer=get_neuron("lif")).double()
    x = 3 * torch.randn(2, 2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = layer.qkv(x)
    assert set(q.unique().tolist()) <= {0.0, 1.0} and q.sum() > 0
    assert (k >= 0).all() and (k > 0).any()
    assert set(v.unique().tolist()) == {-1.0, 0.0, 1.0}
    by_additions = _addition_only_attention(q, k, v)
    assert torch.allclose(layer.attend(q, k, v), by_additions, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer(x), layer.proj(layer.out_neuron(merge_heads(by_additions))), rtol=1e-12,
                          atol=1e-12)


@pytest.mark.parametrize("family", ["spikformer_tiny", "bestformer_tiny", "ann_tiny"])
def test_attention_option_in_every_family(family: str) -> None:
    model = bestformer.create_model(family, attention="a2os2a", img_size=8, embed_dim=16, num_heads=2)
    attn = [m for m in model.modules() if isinstance(m, A2OS2A)]
    assert len(attn) == 1 and attn[0].v_neuron.params.variant == "ternary_spike"
    out = model(torch.randn(2, 1, 8, 8))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    lif_form = bestformer.create_model(family, attention="a2os2a_lif", img_size=8, embed_dim=16, num_heads=2)
    assert next(m for m in lif_form.modules() if isinstance(m, A2OS2A)).v_neuron.params.variant == "lif"


def test_bestformer_a2os2a_keeps_binary_weights() -> None:
    attn = next(m for m in bestformer.create_model("bestformer_tiny", attention="a2os2a").modules()
                if isinstance(m, A2OS2A))
    assert attn.q.linear.weight_bits == 1 and attn.proj.linear.weight_bits == 1


def test_heads_must_divide_width() -> None:
    with pytest.raises(InputError, match="divisible"):
        A2OS2A(dim=10, heads=4, neuron_layer=LIF)


# --------------------------------------------------------------------------------------- registered models


def test_registered_defaults() -> None:
    assert bestformer.list_models("a2os2a_*") == ["a2os2a_2_384", "a2os2a_2_512", "a2os2a_tiny"]
    with torch.device("meta"):
        big = bestformer.create_model("a2os2a_2_512")
    assert (big.embed_dim, len(big.blocks), big.attention, big.weight_bits) == (512, 2, "a2os2a", 32)
    assert not big.reversible and big.head_dist is None
    cfg = bestformer.get_input_config("a2os2a_2_384")
    assert (cfg.img_size, cfg.in_channels, cfg.num_classes, cfg.time_steps) == (32, 3, 10, 4)
    assert bestformer.get_input_config("a2os2a_tiny").dataset == "mnist"


def test_a_few_steps_on_digits_lower_the_loss(digits_losses) -> None:
    losses = digits_losses(bestformer.create_model("a2os2a_tiny", img_size=8, embed_dim=32, time_steps=2))
    assert min(losses[-2:]) < 0.85 * losses[0], losses
