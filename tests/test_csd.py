"""CSDformer: the quantized ANN, its conversion, and the conversion's exactness (T = L, full delay) against
hand-computed traces, float64 references and the ANN itself."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import bestformer
from bestformer.cli import main
from bestformer.convert import (
    IFNeuron,
    QuantNReLU,
    QuantReLU,
    SpikingCSD,
    conversion_errors,
    convert,
    fold_bn,
    if_neuron,
    spike_matmul,
    spike_maxpool2d,
    sweep_delays,
)
from bestformer.errors import ConfigError, InputError
from bestformer.layers import ConvBN, LinearBN
from bestformer.models.csd import CSDTransformer, token_grid

SMALL = dict(embed_dim=32, num_heads=2, img_size=16)  # 16 px: one max-pooling stage, 8 x 8 tokens


def _randomize(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A random but non-degenerate model: random BatchNorm affine, BatchNorm statistics and thetas both set by
    one training-mode forward on ``x`` (the quantizers' data-dependent start), then eval mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the running statistics become those of x
        model.train()
        model(x)
    return model.eval()


def _active_levels(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Fraction of non-zero outputs of every quantized activation (so an exactness test is not trivial)."""
    active: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: active.__setitem__(n, float((o > 0).double().mean())))
             for n, m in model.named_modules() if isinstance(m, QuantReLU)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return active


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    return x[:800], y[:800], x[1500:], y[1500:]


@pytest.fixture(scope="module")
def trained_tiny() -> tuple[CSDTransformer, torch.Tensor, torch.Tensor, float]:
    """csd_tiny (narrowed) trained briefly on scikit-learn digits; returns (model, x_test, y_test, accuracy)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = bestformer.create_model("csd_tiny", img_size=8, embed_dim=32, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(xtr)).split(32):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean())
    return model, xte, yte, acc


# ------------------------------------------------------------------------------------------ quantized ReLU
def test_quant_relu_values_by_hand() -> None:
    # L = 4, theta = 2: q(x) = 0.5 * clamp(floor(2 x + 1/2), 0, 4); ties (2x + 1/2 integer) round up
    act = QuantReLU(levels=4, theta=2.0).eval()
    x = torch.tensor([-1.0, 0.2, 0.25, 0.3, 1.0, 1.75, 3.0])
    assert act(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 2.0, 2.0]
    assert act.precision == 3  # levels 0..4 need 3 bits
    nrelu = QuantNReLU(scale=0.25, levels=4, theta=2.0).eval()
    assert torch.equal(nrelu(x), act(x * 0.25))


def test_quant_relu_gradients_are_qcfs_straight_through() -> None:
    act = QuantReLU(levels=4, theta=2.0).eval()
    x = torch.tensor([-1.0, 0.3, 1.0, 3.0], requires_grad=True)
    act(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # identity inside the clipping range
    # dq/dtheta = n/L - x/theta inside (n = 1: 1/4 - 0.15; n = 2: 2/4 - 0.5), 1 above theta, 0 below
    assert act.theta.grad.item() == pytest.approx(0.0 + 0.1 + 0.0 + 1.0)
    # just outside the range, within half a level (theta / 2L = 0.25), where the floor sits on a bound: the same
    # rule (it passed gradient there: dq/dx = 1, dq/dtheta = -x/theta below 0 and 1 - x/theta above theta)
    act.theta.grad = None
    edge = torch.tensor([-0.2, -0.01, 2.01, 2.2], requires_grad=True)
    act(edge).sum().backward()
    assert edge.grad.tolist() == [0.0, 0.0, 0.0, 0.0] and act.theta.grad.item() == pytest.approx(2.0)


def test_quant_relu_data_dependent_start_happens_once() -> None:
    act = QuantReLU(levels=8)
    x = torch.randn(1000, dtype=torch.float64)
    act(x)
    pos = x.clamp_min(0).float()
    assert act.theta.item() == pytest.approx(float(pos.mean() + 3 * pos.std()), rel=1e-6)
    first = act.theta.item()
    act(x * 10)
    assert act.theta.item() == first and bool(act.initialized)
    fresh = QuantReLU(levels=8)
    fresh.load_state_dict(act.state_dict())
    fresh(x * 10)  # a loaded (trained) quantizer is not re-initialised
    assert fresh.theta.item() == first
    with pytest.raises(ConfigError, match="levels"):
        QuantReLU(levels=0)


# ------------------------------------------------------------------------------------------ IF / DIF neurons
@pytest.mark.parametrize("delay", [0, 3, 8])
def test_if_neuron_with_constant_current_counts_the_quantized_level(delay: int) -> None:
    """Constant input z for T = L steps: theta * count / T equals q(z) exactly, for any delay."""
    act = QuantReLU(levels=8, theta=1.7).double().eval().requires_grad_(False)
    z = torch.linspace(-0.5, 2.5, 301, dtype=torch.float64)
    spikes = if_neuron(z.expand(8, -1), act.threshold().detach(), delay)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(spikes.sum(0) * (act.threshold() / 8), act(z)) and spikes.sum(0).max() == 8


def test_dif_trace_by_hand() -> None:
    """Threshold 1, T = 4, initial membrane 1/2. The ANN level of the total input is floor(sum + 1/2)."""
    early = torch.tensor([1.2, 0.0, -1.0, 0.0]).view(4, 1)  # sum 0.2 -> level 0
    assert if_neuron(early, 1.0, 0).flatten().tolist() == [1, 0, 0, 0]  # fires before the -1 arrives
    assert if_neuron(early, 1.0, 1).flatten().tolist() == [1, 0, 0, 0]
    assert if_neuron(early, 1.0, 2).flatten().tolist() == [0, 0, 0, 0]  # saw the -1 first: exact
    assert if_neuron(early, 1.0, 4).flatten().tolist() == [0, 0, 0, 0]
    late = torch.tensor([0.0, 0.0, 0.0, 3.0]).view(4, 1)  # sum 3 -> level 3
    assert if_neuron(late, 1.0, 0).flatten().tolist() == [0, 0, 0, 1]  # runs out of steps
    assert if_neuron(late, 1.0, 2).flatten().tolist() == [0, 1, 1, 1]
    assert if_neuron(late, 1.0, 3).flatten().tolist() == [1, 1, 1, 0]  # charges the last input, then fires
    assert if_neuron(late, 1.0, 4).flatten().tolist() == [1, 1, 1, 0]
    assert if_neuron(early, 1.0, 3).flatten().tolist() == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="delay"):
        if_neuron(late, 1.0, 5)
    with pytest.raises(ConfigError, match="threshold"):
        IFNeuron(0.0)


def test_full_delay_equals_quantizer_of_the_total_input() -> None:
    """d = T (and d = T - 1): the count is clamp(floor(sum x / theta + 1/2), 0, T) for any input train."""
    x = torch.randn(6, 500, dtype=torch.float64)
    expected = torch.clamp(torch.floor(x.sum(0) / 0.8 + 0.5), 0, 6)
    assert torch.equal(if_neuron(x, 0.8, 6).sum(0), expected)
    assert torch.equal(if_neuron(x, 0.8, 5).sum(0), expected)
    assert not torch.equal(if_neuron(x, 0.8, 0).sum(0), expected)  # the plain IF neuron is not exact


# ------------------------------------------------------------------------------------------ temporal decomposition
def test_temporal_decomposition_equals_the_direct_product() -> None:
    gen = torch.Generator().manual_seed(3)
    a = (torch.rand(7, 2, 3, 5, 4, generator=gen, dtype=torch.float64) < 0.4).double()
    b = (torch.rand(7, 2, 3, 4, 6, generator=gen, dtype=torch.float64) < 0.6).double()
    p = spike_matmul(a, b)
    assert torch.equal(p, p.round()) and p.min() >= 0
    # causal and exact at every prefix: sum_{t' <= t} p_t' = A_{<=t} B_{<=t}
    ca, cb, cp = a.cumsum(0), b.cumsum(0), p.cumsum(0)
    for t in range(7):
        assert torch.equal(cp[t], ca[t] @ cb[t])
    # the formula written out step by step, every term a spike times an integer count
    loop = torch.stack([a[t] @ cb[t] + (ca[t] - a[t]) @ b[t] for t in range(7)])
    assert torch.equal(p, loop)


def test_spike_maxpool_equals_maxpool_of_counts() -> None:
    s = (torch.rand(6, 2, 3, 9, 9, dtype=torch.float64) < 0.3).double()
    out = spike_maxpool2d(s)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    counts = s.cumsum(0)
    for t in range(6):
        assert torch.equal(out[: t + 1].sum(0), F.max_pool2d(counts[t], 3, 2, 1))


def test_fold_bn_float64() -> None:
    lin = LinearBN(6, 5, weight_bits=None, bias=True).double()
    conv = ConvBN(3, 4, weight_bits=None).double()
    for bn in (lin.bn, conv.bn):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        bn.eval()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    w, b = fold_bn(lin.linear.weight, lin.linear.bias, lin.bn)
    assert torch.allclose(F.linear(x, w, b), lin(x), rtol=0, atol=1e-12)
    img = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64)
    w, b = fold_bn(conv.conv.weight, None, conv.bn)
    assert torch.allclose(F.conv2d(img[0], w, b, padding=1), conv(img)[0], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ the ANN
def test_registry_and_token_grid() -> None:
    assert bestformer.list_models("csd_*") == ["csd_4_384", "csd_8_512", "csd_tiny"]
    cfg = bestformer.get_input_config("csd_tiny")
    assert (cfg.img_size, cfg.in_channels, cfg.time_steps) == (28, 1, 1)
    assert token_grid(224, (True,) * 4) == 14 and bestformer.get_input_config("csd_8_512").img_size == 224
    assert bestformer.create_model("csd_tiny").num_tokens == 49  # 28 px -> 7 x 7
    model = bestformer.create_model("csd_tiny", **SMALL, in_channels=2, num_classes=7)
    assert model.num_tokens == 64 and model.attn_scale == 1 / 64
    frames = torch.randn(1, 3, 2, 16, 16)  # the contract itself: tests/test_contract.py
    assert torch.allclose(model.eval()(frames), model(frames.mean(0)))


def test_clear_errors() -> None:
    model = bestformer.create_model("csd_tiny", **SMALL).eval()
    with pytest.raises(InputError, match="channels"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(InputError, match="img_size=16"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(InputError, match="frames"):
        model(torch.randn(4, 2, 1, 16, 16))
    with pytest.raises(ConfigError, match="levels"):
        bestformer.create_model("csd_tiny", levels=0)
    with pytest.raises(ConfigError, match="no option 'level'"):
        bestformer.create_model("csd_tiny", level=4)
    with pytest.raises(ConfigError, match="divisible"):
        bestformer.create_model("csd_tiny", embed_dim=60)
    with pytest.raises(ConfigError, match="spiking"):
        bestformer.create_model("csd_tiny", spiking={"steps": 4})
    with pytest.raises(ConfigError, match="CSDformer ANN"):
        convert(bestformer.create_model("spikformer_tiny"))
    with pytest.raises(ConfigError, match="time_steps"):
        convert(model, time_steps=0)
    with pytest.raises(ConfigError, match="delay"):
        convert(model, time_steps=4, delay=5)
    with pytest.raises(ConfigError, match="already"):
        convert(convert(model))


# ------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize(("levels", "depth"), [(8, 2), (3, 1)])
def test_conversion_is_exact_with_t_equal_l_and_full_delay(levels: int, depth: int) -> None:
    """Random model, float64: the converted logits and features equal the quantized ANN's."""
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    ann = _randomize(bestformer.create_model("csd_tiny", **SMALL, depth=depth, levels=levels).double(), x)
    snn = convert(ann)
    assert (snn.time_steps, snn.delay, snn.latency) == (levels, levels, levels + levels * (5 + 6 * depth))
    active = _active_levels(ann, x)
    assert len(active) == 5 + 8 * depth and min(active.values()) > 0.01, active
    with torch.no_grad():
        ref, out = ann(x), snn(x)
        assert (out - ref).abs().max().item() < 1e-9
        f_ann = ann.forward_head(ann.forward_features(x), pre_logits=True)
        f_snn = snn.forward_head(snn.forward_features(x), pre_logits=True)
        assert (f_ann - f_snn).abs().max().item() < 1e-12
        assert ref.std() > 1e-3  # the test is not exact by being trivially zero
        # event frames: the spiking model integrates them step by step, the ANN sees their mean
        frames = torch.randn(levels, 6, 1, 16, 16, dtype=torch.float64)
        assert (snn(frames) - ann(frames.mean(0))).abs().max().item() < 1e-9


def _is_int(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.round()))


def _is_spike(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


class _SynapticOperands(TorchFunctionMode):
    """Records every linear / convolution / matrix product and the ones with neither a spike (0/1) operand nor,
    for the head and the decomposed products, an integer-count operand. ``analog`` is the first layer's weight
    (it reads the image), ``head`` the classifier's."""

    def __init__(self, analog: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        self.analog, self.head = analog, head
        self.seen: dict[str, int] = {}
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in ("linear", "conv2d", "conv1d", "matmul", "mm", "bmm", "einsum"):
            self.seen[name] = self.seen.get(name, 0) + 1
            a, b = args[0], args[1]
            if b is self.head:
                if not _is_int(a):
                    self.bad.append(f"head input {tuple(a.shape)} is not integer counts")
            elif name in ("linear", "conv2d", "conv1d") and b is not self.analog and not _is_spike(a):
                self.bad.append(f"{name} input {tuple(a.shape)} is not spikes")
            elif name != "linear" and name != "conv2d" and not (
                    (_is_spike(a) and _is_int(b)) or (_is_int(a) and _is_spike(b))):
                self.bad.append(f"{name} {tuple(a.shape)} x {tuple(b.shape)} has no spike operand")
        return func(*args, **(kwargs or {}))


def test_converted_layers_see_only_spikes_or_integer_counts() -> None:
    """Every synaptic operation of the converted model has a spike (0/1) or an integer count as one operand;
    the only exception is the first convolution, which reads the analog image (documented)."""
    x = torch.randn(4, 1, 16, 16)
    ann = _randomize(bestformer.create_model("csd_tiny", **SMALL, depth=2), x)
    snn = convert(ann)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outputs.append(o)) for m in snn.modules()
             if isinstance(m, IFNeuron)]
    check = _SynapticOperands(snn.stem[0].conv.weight, snn.head.weight)
    with torch.no_grad(), check:
        snn(x)
    for h in hooks:
        h.remove()
    assert not check.bad, check.bad
    # 4 convolutions; 2 blocks x 6 linear layers + the head; 2 blocks x 2 decomposed products x 2 terms;
    # IF populations: 4 in the tokenizer, 8 per block (input, Q, K, V, map, output; MLP input, hidden), final
    assert check.seen == {"conv2d": 4, "linear": 13, "matmul": 8}
    assert len(outputs) == 4 + 2 * 8 + 1 and all(_is_spike(o) for o in outputs)
    assert not any(p.requires_grad for p in snn.parameters())
    # the same check flags the ANN it came from (multi-level activations, real attention maps)
    ann_check = _SynapticOperands(ann.stem[0].conv.conv.weight, ann.head.weight)
    with torch.no_grad(), ann_check:
        ann(x)
    assert len(ann_check.bad) == 3 + 2 * 8 + 1  # all but the first convolution


def test_briefly_trained_tiny_model_converts_exactly(trained_tiny) -> None:  # type: ignore[no-untyped-def]
    ann, xte, yte, acc = trained_tiny
    assert acc > 0.6, f"csd_tiny reached only {acc:.3f} on digits"
    assert min(_active_levels(ann, xte[:100]).values()) > 0.01
    snn32 = convert(ann, time_steps=ann.levels)
    with torch.no_grad():
        ref32, out32 = ann(xte[:150]), snn32(xte[:150])
    # float32: the two paths round differently, so a neuron at a level boundary can flip by one level
    assert (ref32.argmax(-1) == out32.argmax(-1)).float().mean() >= 0.99
    assert (ref32 - out32).abs().mean().item() < 1e-4
    [res] = conversion_errors(copy.deepcopy(ann).double(), [(xte[:100].double(), yte[:100])])
    assert res.max_abs < 1e-9 and res.agreement == 1.0 and res.samples == 100
    assert res.snn_accuracy == res.ann_accuracy > 0.6


def test_error_decreases_to_zero_as_delay_reaches_t(trained_tiny) -> None:  # type: ignore[no-untyped-def]
    ann, xte, yte, _ = trained_tiny
    steps = ann.levels
    results = conversion_errors(ann, [(xte[:60], yte[:60])], steps, sweep_delays(steps))
    err = {r.delay: r.mean_abs for r in results}
    print("mean |logit diff| by delay:", {d: round(e, 4) for d, e in err.items()})
    assert [r.delay for r in results] == list(range(steps + 1))
    assert err[steps] < 1e-5 and err[steps - 1] < 1e-5 and err[0] > 1e-2
    upper = [err[d] for d in range(steps // 2, steps + 1)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(upper)), upper  # shrinks as d -> T
    assert upper[0] < err[0]
    assert results[-1].latency == steps + steps * (4 + 6 * len(ann.blocks) + 1)


# ------------------------------------------------------------------------------------------ checkpoint and CLI
def test_spiking_checkpoint_rebuilds_and_cli_convert(tmp_path, trained_tiny, capsys) -> None:  # type: ignore[no-untyped-def]
    ann, xte, _, _ = trained_tiny
    ckpt = bestformer.save_checkpoint(ann, tmp_path / "ann.safetensors", epoch=3)
    out = tmp_path / "snn.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out), "--dataset", "digits", "--limit", "40", "-T", "8"]) == 0
    text = capsys.readouterr().out
    assert "conversion error: max |logit difference|" in text and "accuracy" in text and "<- saved" in text
    snn, meta = bestformer.load_checkpoint(out)
    assert isinstance(snn, SpikingCSD) and (snn.time_steps, snn.delay) == (8, 8)
    assert meta["model_args"]["spiking"] == {"time_steps": 8, "delay": 8}
    assert meta["conversion"]["agreement"] == 1.0 and len(meta["delay_sweep"]) == 9
    with torch.no_grad():
        assert torch.equal(snn(xte[:20]), convert(ann)(xte[:20]))
    assert (tmp_path / "snn.delays.png").stat().st_size > 1000
    assert json.loads((tmp_path / "snn.json").read_text())["model_name"] == "csd_tiny"
    # rebuilt by name: the same structure as a conversion, for load_checkpoint
    rebuilt = bestformer.create_model("csd_tiny", img_size=8, embed_dim=32, num_heads=2,
                                      spiking={"time_steps": 8, "delay": 8})
    assert rebuilt.state_dict().keys() == snn.state_dict().keys()
    # random inputs, a smaller delay, no sweep
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "d2.safetensors"), "--delay", "2", "--no-sweep",
                 "--limit", "16"]) == 0
    text = capsys.readouterr().out
    assert "16 random" in text and "<- saved" not in text
    assert bestformer.load_checkpoint(tmp_path / "d2.safetensors")[0].delay == 2


def test_cli_convert_errors_are_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    other = bestformer.save_checkpoint(bestformer.create_model("spikformer_tiny", embed_dim=32, num_heads=2),
                                       tmp_path / "spk.safetensors")
    csd = bestformer.save_checkpoint(bestformer.create_model("csd_tiny", **SMALL), tmp_path / "csd.safetensors")
    cases = [
        ([str(tmp_path / "missing.safetensors")], "not found"),
        ([str(other)], "CSDformer ANN"),
        ([str(csd), "--delay", "9"], "DIF delay"),
        ([str(csd), "--limit", "0"], "--limit"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv, "-o", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_sweep_delays() -> None:
    assert sweep_delays(4) == [0, 1, 2, 3, 4]
    assert sweep_delays(16) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert sweep_delays(20, points=5) == [0, 5, 10, 15, 20]
