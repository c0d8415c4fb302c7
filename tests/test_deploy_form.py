"""Deployment form (issue 21): re-parameterised convolutions folded before operation counting.

``RepConvBN`` and ``SepConv`` of QSD-Transformer fold exactly (float64) into one dense convolution on spikes;
``deployment_form`` applies the folds to a copy of a model; the profile of the folded ``qsd_tiny`` charges
real-valued MACs to the encoding convolution only (and to the head, on pooled spikes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bestformer.analysis import profile_model
from bestformer.layers import FoldedConv2d, RepConvBN, SepConv, deployment_form, has_deploy_form
from bestformer.layers.qsd import FoldedSepConv
from bestformer.models import create_model
from bestformer.neurons import get_neuron
from bestformer.quant import weight_bits_of


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics in every BatchNorm (as after training)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                m.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)


def _spikes(shape: tuple[int, ...], levels: int, gen: torch.Generator) -> torch.Tensor:
    """Spikes in ``{0, 1/levels, ..., 1}`` (binary for ``levels=1``), about half of them zero."""
    k = torch.randint(0, levels + 1, shape, generator=gen).double()
    return torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, 0.0, k / levels)


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize(("cin", "cout", "bits"), [(6, 6, 4), (5, 7, 2), (4, 4, 32)])
def test_repconvbn_deploy_form_is_exact(levels: int, cin: int, cout: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(cin * 10 + levels)
    torch.manual_seed(cin * 10 + cout + levels)
    layer = RepConvBN(cin, cout, weight_bits=bits).double()
    _randomize_bn(layer, gen)
    layer.eval()
    folded = layer.deploy_form()
    assert isinstance(folded, FoldedConv2d) and folded.kernel_size == (3, 3) and folded.padding == (1, 1)
    assert folded.weight.shape == (cout, cin, 3, 3) and weight_bits_of(folded) == bits
    x = _spikes((2, 3, cin, 5, 6), levels, gen)  # [T, B, C, H, W]
    with torch.no_grad():
        ref, out = layer(x), folded(x)
    assert out.shape == ref.shape == (2, 3, cout, 5, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the border (where the inner BatchNorm's shift of the zero padding enters) is exact too
    torch.testing.assert_close(out[..., 0, :], ref[..., 0, :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [7, 3])
def test_sepconv_deploy_form_is_exact(kernel: int) -> None:
    gen = torch.Generator().manual_seed(kernel)
    torch.manual_seed(kernel)
    layer = SepConv(6, get_neuron("ielif"), weight_bits=4, kernel_size=kernel).double()
    _randomize_bn(layer, gen)
    layer.eval()
    folded = layer.deploy_form()
    assert isinstance(folded, FoldedSepConv) and folded.conv.weight.shape == (6, 12, kernel, kernel)
    assert weight_bits_of(folded.conv) == 4
    for levels in (1, 4):
        x = _spikes((2, 3, 6, 9, 8), levels, gen) * 3 - 1  # real-valued input of neuron1
        with torch.no_grad():
            torch.testing.assert_close(folded(x), layer(x), rtol=0, atol=1e-12)
    # the folded convolution sees neuron2's (multi-level) spikes
    with torch.no_grad():
        spikes = layer.neuron2(layer.pw1(layer.neuron1(x)))
    assert torch.equal(torch.round(spikes * 4), spikes * 4) and spikes.max() > 0


def test_deployment_form_copies_and_folds_every_layer() -> None:
    torch.manual_seed(0)
    model = create_model("qsd_tiny").double()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    model.train()
    before = copy.deepcopy(model.state_dict())
    folded = deployment_form(model)
    assert model.training and not folded.training  # the model is untouched, the copy is in eval mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert has_deploy_form(model) and not has_deploy_form(folded)
    assert not any(isinstance(m, (RepConvBN, SepConv)) for m in folded.modules())
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 3 + 2 * 4  # 3 SepConvs, 2 Q-SDSAs
    model.eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-9)
    # a model without re-parameterised layers comes back as an unchanged copy
    plain = nn.Sequential(nn.Linear(3, 2))
    copied = deployment_form(plain)
    assert copied is not plain and torch.equal(copied[0].weight, plain[0].weight)


def test_folded_qsd_profile_has_real_macs_only_in_the_encoding_convolution_and_the_head() -> None:
    torch.manual_seed(0)
    model = create_model("qsd_tiny")
    _randomize_bn(model, torch.Generator().manual_seed(3))  # neurons fire (initial BatchNorms may not)
    model.float()
    prof = profile_model(model, synthetic=True, batches=1, batch_size=2, progress=False, deploy=False)
    # by hand: 28 x 28 image, stem Conv 7x7 / stride 2 / padding 3 to e0 // 2 = 8 channels, once per image
    out_hw = (28 + 2 * 3 - 7) // 2 + 1
    assert out_hw == 14
    first = out_hw * out_hw * 8 * 1 * 7 * 7
    assert first == 76832
    # the head is a Linear on spikes averaged over tokens and time (real-valued): 64 features x 10 classes
    head = 64 * 10
    real = {layer.name: layer.real_macs for layer in prof.layers if layer.real_macs}
    assert real == {"stem.conv.conv": first, "head": head}
    assert prof.real_macs == first + head
    assert not any(name.endswith((".dw", "pw2.conv", "pw.conv")) for name in (la.name for la in prof.layers))
    # the E_MAC share: the encoding layer's part of the energy, in the summary, the table and the JSON
    em = prof.energy_model
    share = em.e_mac_pj * (first + head) / (em.e_mac_pj * (first + head) + em.e_ac_pj * prof.sops)
    assert prof.e_mac_share == pytest.approx(share)
    assert prof.to_dict()["e_mac_share"] == pytest.approx(share)
    assert f"{100 * share:.1f}% E_MAC" in prof.summary()
