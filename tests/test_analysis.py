"""Efficiency accounting (bestformer.analysis, ``bestformer profile``) against the paper's Tables 2-3, closed-form
MAC counts, hand-computed spike trains and independent computations."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bestformer
from bestformer.analysis import (
    ENERGY_PRESETS,
    OpCounter,
    RepresentationProbe,
    classify_values,
    get_energy_model,
    model_size,
    profile_model,
    value_entropy,
    value_set_size,
)
from bestformer.analysis.report import energy_str, si
from bestformer.cli import main
from bestformer.errors import ConfigError, InputError
from bestformer.layers import SpikingSelfAttention
from bestformer.neurons import IELIF, LIF, is_spiking_neuron
from bestformer.quant import BinaryLinear, QuantConv2d, QuantLinear


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorm the running statistics of ``x`` so that an untrained model's neurons fire in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics of the batch
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def tiny(name: str = "bestformer_tiny", **kw: object) -> nn.Module:
    """A tiny model on 8 x 8 inputs (no pooling: 64 tokens), BatchNorm calibrated on random images."""
    model = bestformer.create_model(name, img_size=8, **kw)
    return calibrate_bn(model, torch.rand(8, 1, 8, 8))


Named = TypeVar("Named")


def by_name(items: Sequence[Named], name: str) -> Named:
    return next(i for i in items if i.name == name)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- Table 2: size
@pytest.mark.parametrize(("name", "classes", "paper_mb"), [
    ("bestformer_4_384", 10, 1.18), ("bestformer_4_384", 100, 1.31), ("bestformer_2_384", 10, 0.73),
    ("bestformer_2_256", 10, 0.34)])
def test_model_size_reproduces_table2(name: str, classes: int, paper_mb: float) -> None:
    model = bestformer.create_model(name, num_classes=classes)
    size = model_size(model, deploy=False)
    assert abs(size.paper_mb - paper_mb) <= 0.01
    assert size.params == sum(p.numel() for p in model.parameters())
    assert size.excluded_heads == ["head_dist"]
    if name == "bestformer_4_384":
        assert size.binary_params == 9_275_904  # the reference's 1-bit count
        # by hand: 1-bit weights / 8 + (first conv 3*48*9 + head 384*classes + classes) * 4 bytes
        assert size.paper_bytes == 9_275_904 / 8 + (3 * 48 * 9 + 384 * classes + classes) * 4


def test_model_size_reads_bits_from_each_layer() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = QuantLinear(20, 10, bias=False, weight_quantizer="binary")
            self.conv = QuantConv2d(3, 4, 3, bias=True, weight_quantizer="lsq4")
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)
            self.head_dist = nn.Linear(4, 3)

    size = model_size(Toy(), deploy=False)
    # 200 1-bit, 108 4-bit, conv bias 4 and head 12 + 3 at 32 bits; BN (8) and the LSQ steps (4) fold away
    assert size.paper_bytes == (200 * 1 + 108 * 4 + (4 + 12 + 3) * 32) / 8
    assert size.params_by_bits == {1: 200, 4: 108, 32: 19}
    assert size.other_params == 8 + 4
    assert size.binary_params == 200


def test_deployment_file_size(tmp_path: Path) -> None:
    deploy = pytest.importorskip("bestformer.deploy.fold")  # registers the deployment-file size
    model = bestformer.create_model("bestformer_tiny").eval()
    size = model_size(model)
    assert size.deploy_bytes is not None, size.deploy_note
    deploy.export_packed(model, tmp_path / "m.bst")
    assert size.deploy_bytes == (tmp_path / "m.bst").stat().st_size
    assert model_size(bestformer.create_model("spikformer_tiny")).deploy_bytes is None  # not packable: no file


# ------------------------------------------------------------------------------------------ operand values
def test_classify_values() -> None:
    assert str(classify_values(torch.tensor([0.0, 1.0, 1.0]))) == "binary"
    assert classify_values(torch.tensor([0.0, 1.0])).bits == 1
    ternary = classify_values(torch.tensor([-1.0, 0.0, 1.0]))
    assert (ternary.kind, ternary.bits, ternary.event) == ("ternary", 2, True)
    qsd = classify_values(torch.arange(5.0) / 4)  # IE-LIF, D = 4: five levels, 3 bits
    assert (qsd.kind, qsd.levels, qsd.bits, qsd.event) == ("multilevel", 5, 3, True)
    amp2 = classify_values(torch.tensor([0.0, 0.5, 1.5, 2.0]))  # amplitude 2, D = 2
    assert (amp2.kind, amp2.levels) == ("multilevel", 5)
    counts = classify_values(torch.tensor([0.0, 3.0, 16.0]))  # an attention count map
    assert (counts.kind, counts.levels, counts.bits, counts.event) == ("integer", 17, 5, True)
    assert not classify_values(torch.tensor([0.0, 3.0, 16.0]), model_input=True).event  # pixel counts
    assert not classify_values(torch.tensor([0.0, 1000.0])).event  # more than 256 levels: a value
    assert classify_values(torch.arange(256.0) / 255, model_input=True).kind == "real"  # an 8-bit image
    bn_at_init = torch.tensor([0.0, 1.0, 2.0, 3.0]) / math.sqrt(1 + 1e-5)
    assert classify_values(bn_at_init).kind == "real"
    assert classify_values(torch.randn(1000)).kind == "real"


# ------------------------------------------------------------------------------------ MACs of each layer type
def test_linear_and_hand_computed_firing_rates() -> None:
    """fp linear (identity) -> LIF(tau 2) -> 1-bit linear on [T=4, B=2, 4] with inputs held over time.

    LIF charge H = V + (X - V) / 2, fire at H >= 1, hard reset: X = sqrt 5 fires at every step (H = 1.118),
    X = sqrt 2 at steps 2 and 4 (0.707, 1.061, 0.707, 1.061), X = 0.9 never (0.45, 0.675, 0.7875, 0.84375),
    X = 0.3 never: 6 of 16 spikes. (Irrational inputs: a layer output on a grid k / D would read as spikes.)
    """
    fc0 = nn.Linear(4, 4)
    with torch.no_grad():
        fc0.weight.copy_(torch.eye(4))
        fc0.bias.zero_()
    model = nn.Sequential(fc0, LIF(tau=2.0), BinaryLinear(4, 3))
    x = torch.tensor([math.sqrt(5), math.sqrt(2), 0.9, 0.3]).expand(4, 2, 4).contiguous()
    with OpCounter(model) as counter:
        counter.run(x, batch_size=2)
    (neuron,) = counter.neuron_stats()
    assert (neuron.name, neuron.spikes, neuron.elements) == ("1", 12, 32)
    assert neuron.firing_rate == 6 / 16
    fp, binary = counter.op_stats()
    assert (fp.name, fp.operands, fp.weight_bits) == ("0", "real x w32", 32)
    assert (fp.macs, fp.real_macs, fp.sops) == (4 * 4 * 4, 4 * 4 * 4, 0)  # per sample: T * C_in * C_out
    assert (binary.name, binary.operands, binary.weight_bits) == ("2", "binary x w1", 1)
    assert (binary.macs, binary.sops, binary.ns_ace, binary.real_macs) == (4 * 4 * 3, 6 * 3, 6 * 3, 0)
    assert binary.firing_rate == neuron.firing_rate  # fr * T * MACs_per_step
    e = ENERGY_PRESETS["45nm"]
    assert e.energy_pj(fp.real_macs + binary.real_macs, fp.sops + binary.sops) == pytest.approx(4.6 * 64 + 0.9 * 18)


def test_conv_macs_and_exact_synaptic_operations() -> None:
    conv = QuantConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, weight_quantizer="binary")
    x = (torch.rand(3, 4, 9, 9) < 0.3).float()
    with OpCounter(conv) as counter:
        counter.run(x)
    (op,) = counter.op_stats()
    # closed form: numel(out) * C_in / groups * k * k, per sample
    assert op.macs == 6 * 5 * 5 * (4 // 2) * 3 * 3
    # independent count: unfold every receptive field and count its non-zero taps, per group
    taps = [F.unfold(x[:, g * 2:(g + 1) * 2], 3, padding=1, stride=2).ne(0).sum().item() for g in range(2)]
    assert op.sops == sum(t * 3 for t in taps) / 3  # 3 output channels per group, per sample
    # by hand: one spike in the corner of a 3x3 map reaches 4 output positions, in the centre all 9
    single = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    for pos, reach in (((0, 0), 4), ((1, 1), 9)):
        spike = torch.zeros(1, 1, 3, 3)
        spike[0, 0, pos[0], pos[1]] = 1
        with OpCounter(single) as counter:
            counter.run(spike)
        assert counter.op_stats()[0].sops == reach * 2


def test_matmul_of_two_spike_operands_counts_joint_non_zeros() -> None:
    class QK(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return q @ k.transpose(-1, -2)

    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    model = QK()
    with OpCounter(model) as counter, torch.no_grad():
        model(q, k)
    (op,) = counter.op_stats()
    # (q0, k0): 1 product with both non-zero, (q0, k1): 0, (q1, k0): 2, (q1, k1): 1; 2 x 2 x 2 MACs in all
    assert (op.name, op.operands, op.macs, op.sops, op.charge_bits) == ("(model)/matmul0", "binary x binary", 8, 4,
                                                                         16)  # fp_bits: 16 by default


@pytest.mark.parametrize("mode", ["token", "channel", "ssa"])
def test_attention_products_against_closed_forms(mode: str) -> None:
    t, b, n, c, heads = 2, 3, 5, 8, 2
    d = c // heads
    attn = SpikingSelfAttention(c, heads, mode, t, LIF, weight_bits=1)
    x = torch.randn(t, b, n, c) * 3
    with OpCounter(attn) as counter:
        counter.run(x, batch_size=b)
    ops = {o.name: o for o in counter.op_stats()}
    first, second = ops["(model)/matmul0"], ops["(model)/matmul1"]
    if mode == "channel":  # K^T V (d x N x d), then Q (K^T V)_b (N x d x d)
        assert first.macs == t * heads * d * n * d and second.macs == t * heads * n * d * d
    else:  # Q K^T (N x d x N), then Attn V (N x N x d)
        assert first.macs == t * heads * n * d * n and second.macs == t * heads * n * n * d
    for name in ("q.linear", "k.linear", "v.linear", "proj.linear"):
        assert ops[name].macs == t * n * c * c and ops[name].weight_bits == 1
    # the spike-driven products count exactly the pairs of non-zero operands
    q, k, v = attn.qkv(x)
    if mode == "token":
        assert first.operands == "binary x binary"
        assert first.sops == (q.ne(0).double() @ k.ne(0).double().transpose(-1, -2)).sum().item() / b
    if mode == "ssa":  # the count map Q K^T is an event operand too (a count k is k spikes)
        counts = q @ k.transpose(-1, -2)
        assert second.sops == (counts.ne(0).double() @ v.ne(0).double()).sum().item() / b
        assert 0 < second.sops < second.macs
    assert all(o.charge_bits == 1 for o in ops.values())  # 1-bit block: activation products charged at 1


def test_einsum_is_counted_like_matmul() -> None:
    class E(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bij,bjk->bik", a, b)

    a, b = (torch.rand(2, 3, 4) < 0.5).float(), torch.randn(2, 4, 5)
    model = E()
    with OpCounter(model) as counter, torch.no_grad():
        model(a, b)
    (op,) = counter.op_stats()
    assert op.macs == 2 * 3 * 4 * 5 and op.sops == a.sum().item() * 5 and op.operands == "binary x real"


def test_full_precision_baseline_is_counted_at_16_bits_as_table2() -> None:
    with torch.device("meta"):
        spikformer = bestformer.create_model("spikformer_8_512")
        bestformer_4 = bestformer.create_model("bestformer_4_384")
    size = model_size(spikformer, deploy=False)
    params = sum(p.numel() for p in spikformer.parameters())
    assert size.fp_bits == 16 and size.paper_bytes == params * 2  # every parameter at 16 bits
    assert size.paper_mb == pytest.approx(59.36, rel=1e-3)  # Table 2: 29.68 M parameters, 59.36 MB
    assert model_size(spikformer, deploy=False, fp_bits=32).paper_bytes == params * 4
    # a quantized model keeps its full-precision parts at 32 bits (Table 2's 1.18 MB needs them), whatever fp_bits
    assert model_size(bestformer_4, deploy=False, fp_bits=8).paper_bytes == model_size(bestformer_4,
                                                                                      deploy=False).paper_bytes
    with pytest.raises(ConfigError, match="fp_bits must be an integer in"):
        model_size(spikformer, deploy=False, fp_bits=0)


# --------------------------------------------------------------------------------- Table 3: NS-ACE relations
def test_ns_ace_charges_full_precision_at_16_bits_by_default() -> None:
    prof = profile_model(tiny("spikformer_tiny"), synthetic=True, batches=1, batch_size=2, deploy=False,
                         progress=False)
    assert prof.fp_bits == 16 and prof.ns_ace == pytest.approx(16 * prof.sops, rel=1e-12)  # Table 3's relation


@pytest.mark.parametrize(("name", "kw", "fp_bits", "factor"), [
    ("bestformer_tiny", {}, 32, 1),  # 1-bit weights and spikes: NS-ACE = SOPs (2.13 G = 2.13 G)
    ("bestformer_tiny", {"weight_bits": 2}, 32, 2),  # 2-bit weights: 2 x SOPs (3.93 G -> 7.86 G)
    ("spikformer_tiny", {}, 16, 16),  # full precision counted at 16 bits: 16 x SOPs (6.52 G -> 104.32 G)
])
def test_ns_ace_reproduces_table3_relations(name: str, kw: dict, fp_bits: int, factor: int) -> None:
    prof = profile_model(tiny(name, **kw), synthetic=True, batches=1, batch_size=2, fp_bits=fp_bits,
                         deploy=False, progress=False)
    assert prof.sops > 0 and prof.real_macs > 0
    assert prof.ns_ace == pytest.approx(factor * prof.sops, rel=1e-12)
    for layer in prof.layers:  # the first convolution and the heads are real-valued MACs, not in NS-ACE
        assert layer.ns_ace == pytest.approx(factor * layer.sops, rel=1e-12)
    assert {layer.name for layer in prof.layers if layer.real_macs} >= {"patch_embed.proj.conv", "head"}
    e = get_energy_model("45nm")
    assert prof.energy_pj == pytest.approx(4.6 * prof.real_macs + 0.9 * prof.sops)
    assert prof.energy_pj == pytest.approx(sum(prof.layer_energy_pj(layer) for layer in prof.layers))
    assert (e.e_mac_pj, e.e_ac_pj) == (4.6, 0.9)


def test_layer_firing_rate_equals_the_neuron_feeding_it() -> None:
    """Two independent mechanisms agree: the function-mode count of a linear layer's input and the module hook
    on the neuron that produced it."""
    prof = profile_model(tiny(), synthetic=True, batches=1, batch_size=3, deploy=False, progress=False)
    for neuron, layer in (("blocks.0.mlp.neuron1", "blocks.0.mlp.fc1.linear"),
                          ("blocks.0.mlp.neuron2", "blocks.0.mlp.fc2.linear"),
                          ("blocks.0.attn.in_neuron", "blocks.0.attn.q.linear")):
        fr = by_name(prof.neurons, neuron).firing_rate
        assert 0 < fr < 1
        assert by_name(prof.layers, layer).firing_rate == pytest.approx(fr, rel=1e-12)
    names = [n.name for n in prof.neurons]  # every LIF, the SR-LIF of Eq. 9 included; no pooling, no BN
    assert "blocks.0.attn.attn_neuron" in names and len(names) == 12
    assert by_name(prof.layers, "blocks.0.attn/matmul0").macs == 4 * 4 * 64 * 16 * 64  # T heads N d N


class _LevelsThenLinear(nn.Module):
    """IE-LIF (D = 4) spikes, reshaped, into a full-precision linear layer."""

    def __init__(self, amplitude: float = 1.0) -> None:
        super().__init__()
        self.neuron = IELIF(levels=4, amplitude=amplitude)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.neuron(x).reshape(x.shape[0], x.shape[1], 6))


@pytest.mark.parametrize("amplitude", [1.0, 2.0])
def test_multilevel_spikes_are_charged_by_their_declared_levels(amplitude: float) -> None:
    model = _LevelsThenLinear(amplitude)
    x = torch.tensor([0.0, 0.3, 0.6, 1.2, 2.0, 5.0]).repeat(2, 1).view(1, 2, 2, 3)  # [T=1, B=2, 2, 3]
    s = model.neuron(x)
    levels = torch.round(s / (amplitude / 4))  # the binary spikes each output stands for (4-1-4 form)
    assert set(levels.unique().tolist()) > {0.0, 1.0} and levels.max() <= 4
    with OpCounter(model) as counter:
        counter.run(x, batch_size=2)
    (fc,) = [op for op in counter.op_stats() if op.name == "fc"]
    assert fc.operands == "multilevel5 x w32"  # D + 1 = 5 values: ceil(log2 5) = 3 bits
    assert fc.events == int(torch.count_nonzero(s)) * 2 / 2  # per sample
    assert fc.sops == levels.sum().item() * 2 / 2
    assert fc.ns_ace == 16 * 3 * fc.events  # b_w (full precision at 16) x b_a x non-zero products
    # a batch whose spikes only reach level 2 is still charged the declared 3 bits (the data alone: 1 or 2 bits)
    low = torch.full((1, 2, 2, 3), 0.45)
    assert set(torch.round(model.neuron(low) / (amplitude / 4)).unique().tolist()) <= {0.0, 1.0, 2.0}
    with OpCounter(model) as counter:
        counter.run(low, batch_size=2)
    (fc,) = [op for op in counter.op_stats() if op.name == "fc"]
    assert fc.operands == "multilevel5 x w32" and fc.ns_ace == 16 * 3 * fc.events


def test_ann_counts_only_real_macs_and_presets() -> None:
    prof = profile_model(bestformer.create_model("ann_tiny"), synthetic=True, batches=1, batch_size=2,
                         energy="int8", deploy=False, progress=False)
    assert prof.sops == 0 and prof.ns_ace == 0 and prof.neurons == []
    assert prof.real_macs == prof.macs > 0
    assert prof.energy_pj == pytest.approx(0.23 * prof.macs)
    assert (ENERGY_PRESETS["fp16"].e_mac_pj, ENERGY_PRESETS["fp16"].e_ac_pj) == (1.5, 0.4)


def _bits_of(kind: str) -> int:
    """Bits of a kind as printed in ``operands`` (``binary``, ``ternary``, ``multilevel5``, ``integer17``)."""
    levels = {"binary": 2, "ternary": 3}.get(kind) or int(kind.lstrip("abcdefghijklmnopqrstuvwxyz"))
    return math.ceil(math.log2(levels))


@pytest.mark.parametrize("name", bestformer.list_models("*_tiny"))
def test_every_family_is_accounted_without_family_code(name: str) -> None:
    """Invariants on every registered tiny model (BESTformer, Spikformer, ANN, A2OS2A, QSD, CSD, ...)."""
    cfg = bestformer.get_input_config(name)
    model = calibrate_bn(bestformer.create_model(name), torch.rand(4, cfg.in_channels, cfg.img_size, cfg.img_size))
    prof = profile_model(model, synthetic=True, batches=1, batch_size=1, deploy=False, progress=False)
    assert prof.macs > 0 and prof.model_size_mb > 0 and prof.samples == 1
    assert (prof.sops > 0) == bool(prof.neurons)  # spiking models have synaptic operations, ANNs none
    for layer in prof.layers:
        assert layer.real_macs + layer.events <= layer.macs and layer.sops >= layer.events
        kinds = layer.operands.split(" x ")
        if "multilevel" not in layer.operands:  # only declared multi-level spikes stand for several binary ones
            assert layer.sops == layer.events
        if layer.weight_bits is not None and layer.sops and "|" not in layer.operands:
            # weight layer fed by one kind of event: NS-ACE = b_w * b_a * (non-zero event products) exactly
            assert layer.ns_ace == layer.charge_bits * _bits_of(kinds[0]) * layer.events
    for neuron in prof.neurons:
        assert 0 <= neuron.firing_rate <= 1 and neuron.elements > 0


# ---------------------------------------------------------------------------------- representation (Fig. 2/5b)
def test_value_set_size_and_entropy_by_hand() -> None:
    x = torch.tensor([0.0, 0.0, 1.0, 2.0])
    assert value_set_size(x) == 3
    assert value_entropy(x) == pytest.approx(1.5)  # -(1/2 log2 1/2 + 2 * 1/4 log2 1/4)
    assert value_entropy(torch.ones(7)) == 0.0

    class Block(nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = offset

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x + self.offset

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(0.0), Block(10.0)])

        def forward(self, x: torch.Tensor) -> None:
            for blk in self.blocks:
                blk(x)

    x = torch.tensor([[0.0, 0.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]]).view(1, 2, 4)  # [T=1, B=2, 4]
    model = Toy()
    with RepresentationProbe(model) as probe:
        probe.set_batch(2)
        model(x)
    r0, r1 = probe.results()
    # sample 0: values {0, 0, 1, 2} twice (3 distinct, 1.5 bits); sample 1: 5 x 8 (1 value, 0 bits)
    assert (r0.set_size, r0.set_size_max, r0.entropy_bits) == (2.0, 3, pytest.approx(0.75))
    # block 1 outputs {0,0,1,2} and {10,10,11,12}: 6 values, 2.5 bits; and {5} and {15}: 2 values, 1 bit
    assert (r1.set_size, r1.entropy_bits) == (4.0, pytest.approx(1.75))
    assert r1.streams[1]["set_size"] == 2.0 and r1.samples == 2


@pytest.mark.parametrize("reversible", [True, False])
def test_representation_matches_direct_computation(reversible: bool) -> None:
    model = tiny(reversible=reversible, distill_head=reversible)
    x = torch.rand(3, 1, 8, 8)
    prof = profile_model(model, x, representation=True, deploy=False, progress=False)
    with torch.no_grad():
        streams = model.forward_streams(x)  # the only block's output(s)
    sizes = [value_set_size(torch.cat([s[:, i].flatten() for s in streams])) for i in range(3)]
    (rep,) = prof.representation
    assert rep.name == "blocks.0" and rep.set_size == pytest.approx(np.mean(sizes)) and rep.set_size_max == max(sizes)
    assert len(rep.streams) == (2 if reversible else 1)
    assert 0 < rep.entropy_bits <= math.log2(rep.set_size_max) + 1e-9


# ------------------------------------------------------------------------------------------- inputs and API
def test_profile_on_real_digits_through_a_dataloader() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:8] / 16.0, dtype=torch.float32).unsqueeze(1)
    images = (images - images.mean()) / images.std()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.tensor(digits.target[:8])),
                                         batch_size=4)
    model = bestformer.create_model("bestformer_tiny", img_size=8)
    calibrate_bn(model, images)
    prof = profile_model(model, loader, batches=2, measured_on="digits", deploy=False, progress=False)
    assert prof.samples == 8 and prof.firing_rates_measured_on == "digits"
    # independent measurement of one neuron with a plain forward hook
    seen = []
    handle = model.blocks[0].mlp.neuron1.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    handle.remove()
    fr = sum(s.count_nonzero().item() for s in seen) / sum(s.numel() for s in seen)
    assert by_name(prof.neurons, "blocks.0.mlp.neuron1").firing_rate == pytest.approx(fr)
    assert model.training is False


def test_event_batches_of_a_dataloader_are_put_time_first() -> None:
    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=2, time_steps=4)
    rate = torch.linspace(0.05, 0.6, 4).view(1, 4, 1, 1, 1)  # the event rate grows with t: time matters
    frames = (torch.rand(8, 4, 2, 8, 8) < rate).float()  # [N, T, C, H, W], as an event dataset stores them
    calibrate_bn(model, frames[:4].transpose(0, 1))
    by_hand = profile_model(model, [frames[:4].transpose(0, 1), frames[4:].transpose(0, 1)], deploy=False,
                            progress=False)  # bare tensors: the model's input [T, B, ...] as given
    data = torch.utils.data.TensorDataset(frames, torch.zeros(8, dtype=torch.long))
    for batch_size in (4, 2):  # B == T once (a silent swap before), B != T once (an error before)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
        prof = profile_model(model, loader, batches=8 // batch_size, deploy=False, progress=False)
        assert prof.samples == 8 and prof.sops == pytest.approx(by_hand.sops)


def test_event_count_input_is_charged_at_e_mac_through_a_copy_or_a_mean_over_frames() -> None:
    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=16, in_channels=2, time_steps=4)
    counts = torch.randint(0, 4, (2, 4, 2, 16, 16)).float()  # [B, T, C, H, W] event counts 0..3
    calibrate_bn(model, counts.transpose(0, 1).contiguous())
    first = "patch_embed.proj.conv"
    for inputs in ([(counts, torch.zeros(2))], counts.transpose(0, 1).contiguous()):  # a time-first view, a tensor
        op = by_name(profile_model(model, inputs, deploy=False, progress=False).layers, first)
        # T * H * W * C_out * C_in * 9 = 4 * 16 * 16 * 8 * 2 * 9, all real (the view's copy was an event before)
        assert op.macs == op.real_macs == 147456 and op.sops == 0, op.operands
    ann = bestformer.create_model("csd_tiny", in_channels=2, img_size=16, input_frames=4).eval()
    frames = torch.randint(0, 4, (4, 1, 2, 16, 16)).float()  # the ANN averages them: a k/4 grid
    prof = profile_model(ann, frames, deploy=False, progress=False)
    assert prof.layers[0].sops == 0 and prof.layers[0].real_macs == prof.layers[0].macs > 0


def test_a_fresh_quantized_ann_is_counted_as_an_ann() -> None:
    # QuantReLU starts at theta = 1, so its outputs sit on a k/8 grid: they read as multi-level spikes before
    ann = bestformer.create_model("csd_tiny", img_size=8, in_channels=1).eval()
    prof = profile_model(ann, synthetic=True, batches=1, batch_size=1, deploy=False, progress=False)
    assert prof.neurons == [] and prof.sops == 0
    assert all(op.real_macs == op.macs > 0 for op in prof.layers)


def test_a_neuron_is_counted_in_every_batch_even_when_its_input_is_silent() -> None:
    lif = nn.Sequential(nn.Identity(), LIF())  # LIF at threshold 1 on a constant input: the first batch fires
    with OpCounter(lif) as counter:
        counter.run(torch.full((4, 1, 8), 3.0))
        counter.run(torch.zeros(4, 1, 8))  # silent (binary) input: the layer was dropped from this batch before
    (stats,) = counter.neuron_stats()
    assert (stats.spikes, stats.elements) == (32, 64)
    fresh = bestformer.create_model("bestformer_tiny", img_size=8)  # untrained: silence spreads layer to layer
    prof = profile_model(fresh, synthetic=True, batches=1, batch_size=2, deploy=False, progress=False)
    neurons = [n for n, m in fresh.named_modules() if is_spiking_neuron(m)]
    assert [s.name for s in prof.neurons] == neurons and len(neurons) > 5


def test_profile_reads_the_dataset_with_the_data_package() -> None:
    data = pytest.importorskip("bestformer.data")
    if "digits" not in data.list_datasets():
        pytest.skip("the digits dataset is not registered")
    model = bestformer.create_model("bestformer_tiny", img_size=8)
    prof = profile_model(model, dataset="digits", batches=1, batch_size=4, deploy=False, progress=False)
    assert prof.firing_rates_measured_on.startswith("digits") and prof.samples == 4


def test_profile_errors_are_one_line() -> None:
    model = bestformer.create_model("bestformer_tiny")
    with pytest.raises(ConfigError, match="one of inputs, data or synthetic"):
        profile_model(model, torch.rand(1, 1, 28, 28), synthetic=True)
    with pytest.raises(ConfigError, match="batches must be"):
        profile_model(model, synthetic=True, batches=0)
    with pytest.raises(ConfigError, match="did you mean '45nm'"):
        profile_model(model, synthetic=True, energy="45mn")
    with pytest.raises(InputError, match="no input batches"):
        profile_model(model, [], deploy=False)
    with pytest.raises(InputError, match="channels"):
        profile_model(model, torch.rand(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="encoder blocks"):
        profile_model(nn.Sequential(nn.Linear(2, 2)), torch.rand(1, 2), representation=True)


def test_profile_json_table_and_plot(tmp_path: Path) -> None:
    prof = profile_model(tiny(), synthetic=True, batches=1, batch_size=2, representation=True, deploy=False,
                         progress=False)
    data = json.loads(prof.to_json(tmp_path / "p.json"))
    assert json.loads((tmp_path / "p.json").read_text()) == data
    for key in ("model_size_mb", "params", "binary_params", "macs", "sops", "energy_pj", "ns_ace",
                "firing_rates_measured_on", "layers"):
        assert key in data
    assert data["firing_rates_measured_on"] == "synthetic"
    assert data["macs"] == pytest.approx(sum(layer["macs"] for layer in data["layers"]))
    # decimal prefixes: a tiny model reads in kB, not as "0.00 MB"
    assert "synthetic" in prof.summary() and f"{si(prof.size.paper_bytes, 'B')} (paper convention)" in prof.summary()
    assert si(1_180_000, "B") == "1.18 MB" and si(3_672, "B") == "3.67 kB"
    # rounded before the prefix is chosen: never "1e+03 k"
    assert (si(999_600), si(999.6, "B"), si(-999_600), si(999_400)) == ("1 M", "1 kB", "-1 M", "999 k")
    assert (energy_str(999_700), energy_str(999.4)) == ("1 µJ", "999 pJ")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(prof.table())
    text = console.export_text()
    assert "blocks.0.attn/matmul0" in text and "NS-ACE" in text and "representation" in text
    png = prof.plot(tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_profile_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out.png"
    rc = main(["profile", "bestformer_tiny", "--synthetic", "--batches", "1", "--batch-size", "2",
               "--time-steps", "2", "--json", "--plot", str(png), "--fp-bits", "16"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "bestformer_tiny" and data["time_steps"] == 2 and data["ns_ace_fp_bits"] == 16
    assert data["firing_rates_measured_on"] == "synthetic"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_profile_of_a_checkpoint_measures_on_its_runs_own_validation_carve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bestformer.data import build_datasets

    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=1)
    ckpt = bestformer.save_checkpoint(model, tmp_path / "c.safetensors", dataset="digits",
                                      config={"dataset": "digits", "seed": 5, "val_fraction": 0.5})
    assert main(["profile", str(ckpt), "--batches", "2", "--batch-size", "4", "--json", "-"]) == 0
    cli = json.loads(capsys.readouterr().out)
    val = build_datasets("digits", seed=5, val_fraction=0.5).val  # the run's carve, built independently
    own = profile_model(model, torch.utils.data.DataLoader(val, batch_size=4), batches=2, progress=False)
    default = profile_model(model, dataset="digits", batches=2, batch_size=4, progress=False)
    assert cli["samples"] == 8 and cli["firing_rates_measured_on"] == "digits (val)"
    assert cli["sops"] == pytest.approx(own.sops) and cli["sops"] != pytest.approx(default.sops)


def test_cli_profile_checkpoint_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = bestformer.create_model("bestformer_tiny", time_steps=2)
    ckpt = bestformer.save_checkpoint(model, tmp_path / "c.safetensors")
    out_json = tmp_path / "c.json.out"
    assert main(["profile", str(ckpt), "--synthetic", "--batches", "1", "--batch-size", "1",
                 "--json", str(out_json)]) == 0
    assert "totals" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["time_steps"] == 2
    assert main(["profile", str(ckpt), "--num-classes", "5", "--synthetic"]) == 2
    assert "apply to a model name" in capsys.readouterr().err
    assert main(["profile", "bestformer_tiyn", "--synthetic"]) == 2
    assert "did you mean 'bestformer_tiny'" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_evaluating_or_profiling_keeps_each_submodules_mode() -> None:
    """A model training with its BatchNorm layers frozen (eval mode, timm-style fine-tuning) got back every
    BatchNorm in training mode after evaluate() or profile_model(): their statistics then drifted."""
    from torch.utils.data import TensorDataset

    model = tiny(num_classes=2).train()
    frozen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][::2]
    for bn in frozen:
        bn.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert not all(modes.values()) and any(modes.values())
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, _args: seen.append(any(x.training for x in m.modules())))
    data = TensorDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    bestformer.evaluate(model, data, num_classes=2)
    assert {name: m.training for name, m in model.named_modules()} == modes
    profile_model(model, synthetic=True, batches=1, batch_size=2, deploy=False, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    handle.remove()
    assert seen and not any(seen)  # every forward in between ran wholly in eval mode
