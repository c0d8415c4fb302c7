"""The BESTformer family against the reference implementation and the paper's equations."""

from __future__ import annotations

import pytest
import torch

import bestformer
from bestformer.errors import ConfigError, InputError
from bestformer.layers import ReversibleBlock, SpikingSelfAttention, auto_pool_stages
from bestformer.layers.blocks import ResidualBlock
from bestformer.neurons import LIF, get_neuron
from bestformer.quant import weight_bits_of

SMALL = dict(embed_dim=32, depth=1, num_heads=2, img_size=16, time_steps=2)


def _binary_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if weight_bits_of(m) == 1)


@pytest.mark.parametrize(("classes", "total"), [(10, 9_314_884), (100, 9_384_184)])
def test_parameter_counts_equal_reference(classes: int, total: int) -> None:
    model = bestformer.create_model("bestformer_4_384", num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == total
    assert _binary_params(model) == 9_275_904


def test_public_api_resolves_lazily() -> None:
    import subprocess
    import sys

    code = ("import sys, bestformer; print('torch' in sys.modules); "
            "print(all(callable(getattr(bestformer, n)) or n == '__version__' for n in bestformer.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True"]  # importing the package loads no torch; every name resolves
    assert bestformer.train.__module__ == "bestformer.pipeline.jobs"  # the job runner (docs/architecture.md)
    assert bestformer.profile_model.__module__ == "bestformer.analysis.profile"


def test_registry_lists_every_family_and_size() -> None:
    names = bestformer.list_models()
    for family in ("bestformer", "spikformer", "ann"):
        for size in ("tiny", "2_256", "2_384", "4_384", "6_384", "8_512"):
            assert f"{family}_{size}" in names
    assert bestformer.list_models("spikformer_*") == [n for n in names if n.startswith("spikformer_")]
    cfg = bestformer.get_input_config("bestformer_2_256")
    assert (cfg.in_channels, cfg.img_size, cfg.time_steps) == (2, 128, 16)


def test_family_switches() -> None:
    best = bestformer.create_model("bestformer_tiny")
    assert isinstance(best.blocks[0], ReversibleBlock) and best.head_dist is not None
    assert best.blocks[0].attn.mode == "token"
    spik = bestformer.create_model("spikformer_tiny")
    assert isinstance(spik.blocks[0], ResidualBlock) and spik.head_dist is None
    assert _binary_params(spik) == 0
    ann = bestformer.create_model("ann_tiny")
    assert not any(isinstance(m, LIF) for m in ann.modules()) and ann.time_steps == 1
    assert bestformer.create_model("bestformer_8_512").blocks[0].attn.mode == "channel"
    plain = bestformer.create_model("bestformer_tiny", reversible=False, distill_head=False)
    assert isinstance(plain.blocks[0], ResidualBlock) and plain.head_dist is None


def test_two_heads_in_training_mean_in_eval() -> None:
    model = bestformer.create_model("bestformer_tiny", **SMALL, in_channels=1)
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (4, 2, 32)
    logits, logits_dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    assert torch.allclose(model(x), (logits + logits_dist) / 2)
    model.train()
    assert isinstance(model(x), tuple)


def test_reversible_inverse_reconstructs_inputs_float64() -> None:
    """Eq. 13 recovers the inputs of a block from its outputs (float64, relative error < 1e-9)."""
    model = bestformer.create_model("bestformer_tiny", embed_dim=32, num_heads=2, time_steps=3).double().eval()
    block = model.blocks[0]
    x0 = torch.randn(3, 2, 10, 32, dtype=torch.float64)
    x1 = torch.randn(3, 2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        y0, y1 = block(x0, x1)
        r0, r1 = block.inverse(y0, y1)
    for ref, rec in ((x0, r0), (x1, r1)):
        assert ((rec - ref).norm() / ref.norm()).item() < 1e-9
    stats = [b.clone() for b in block.buffers()]
    with pytest.raises(ConfigError, match="needs eval mode"):
        block.train().inverse(y0, y1)  # batch statistics would not invert the forward, and would be learned
    assert all(torch.equal(a, b) for a, b in zip(stats, block.buffers(), strict=True))


def _sr_lif_by_hand(maps: torch.Tensor) -> list[torch.Tensor]:
    """The attention neuron over T (SR-LIF, tau = 2, V_th = 1, decay_input charge): one spike map per step."""
    mem, spikes = torch.zeros_like(maps[0]), []
    for t in range(maps.shape[0]):
        h = mem + (maps[t] - mem) / 2
        s = (h >= 1).double()
        mem = h - s
        spikes.append(s)
    return spikes


def _attention(mode: str, seed: int, tokens: int
               ) -> tuple[SpikingSelfAttention, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    attn = SpikingSelfAttention(8, 2, mode, time_steps=3, neuron_layer=get_neuron("lif")).double()
    with torch.no_grad():
        attn.lam.copy_(torch.rand_like(attn.lam) + 0.5)
    return (attn, *((torch.rand(3, 1, 2, tokens, 4) > 0.5).double() for _ in range(3)))


def test_token_attention_matches_hand_computation() -> None:
    """Eq. 8-9: Attn = Q K^T (integers), binarized over T by a soft-reset LIF, times lambda and 0.125."""
    attn, q, k, v = _attention("token", 1, 5)
    a = q @ k.transpose(-1, -2)
    assert torch.equal(a, a.round()) and a.min() >= 0
    expected = torch.stack([s @ v[t] * attn.lam[t] * 0.125 for t, s in enumerate(_sr_lif_by_hand(a))])
    assert torch.allclose(attn.attend(q, k, v), expected)


def test_channel_attention_matches_hand_computation() -> None:
    """Channel attention (linear in N): Q SR-LIF(K^T V) times lambda and 0.125, the d x d map binarized over T."""
    attn, q, k, v = _attention("channel", 2, 50)
    kv = k.transpose(-1, -2) @ v
    assert kv.shape[-2:] == (4, 4)  # d x d map, independent of N
    expected = torch.stack([q[t] @ s * attn.lam[t] * 0.125 for t, s in enumerate(_sr_lif_by_hand(kv))])
    assert 0 < int(expected.count_nonzero()) < expected.numel()  # the map neither silent nor saturated
    assert torch.allclose(attn.attend(q, k, v), expected)


def test_gradients_reach_latent_weights_and_lambda() -> None:
    model = bestformer.create_model("bestformer_tiny", **SMALL, in_channels=1)
    lam = model.blocks[0].attn.lam
    with torch.no_grad():  # at lambda = 1 the attention output neuron of a random tiny model rarely fires, and a
        lam.fill_(16.0)  # silent neuron's successor (proj) has no input to take a weight gradient from
    logits, logits_dist = model(torch.randn(4, 1, 16, 16))
    (logits.sum() + logits_dist.sum()).backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    for m in model.modules():
        if weight_bits_of(m) == 1:
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_event_input_and_pooling_rules() -> None:
    assert auto_pool_stages(32) == (False, False, True, True)
    assert auto_pool_stages(224) == (True, True, True, True)
    assert auto_pool_stages(128) == (True, True, True, True)
    assert auto_pool_stages(8) == (False, False, False, False)
    model = bestformer.create_model("bestformer_tiny", embed_dim=32, num_heads=2, in_channels=2, img_size=28)
    streams = model.forward_streams(torch.rand(4, 3, 2, 28, 28))  # event frames [T, B, C, H, W]
    assert streams[0].shape == (4, 3, 49, 32)  # 28 -> 14 -> 7: 7 x 7 tokens


def test_bad_input_gives_clear_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'bestformer_4_384'"):
        bestformer.create_model("bestformer_4_348")
    with pytest.raises(ConfigError, match="no option 'num_class'.*did you mean 'num_classes'"):
        bestformer.create_model("bestformer_tiny", num_class=3)
    with pytest.raises(ConfigError, match="time_steps must be an integer >= 1"):
        bestformer.create_model("bestformer_tiny", time_steps=0)
    model = bestformer.create_model("bestformer_tiny")
    with pytest.raises(InputError, match="expected images"):
        model(torch.randn(28, 28))
    with pytest.raises(InputError, match="3 channels, the model expects in_channels=1"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(InputError, match="expects img_size=28"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(InputError, match="T=2 frames but the model has time_steps=4"):
        model(torch.randn(2, 2, 1, 28, 28))
