"""The converted, spike-driven CSDformer: every layer of a ``csd_*`` ANN replaced by its spiking counterpart.

Built by :func:`bestformer.convert.convert` (each class converts the ANN module it mirrors). Conventions:

- a quantized activation ``q`` with clipping value ``theta`` becomes an :class:`IFNeuron` with threshold
  ``theta`` (delay ``d``); its spikes carry the amplitude ``theta``, which is folded into the weights of the
  layer that reads them, so every linear and convolutional layer receives binary spikes;
- BatchNorm is folded into the linear or convolutional layer before it (:func:`bestformer.layers.fold.fold_bn`);
- ``Q K^T`` and ``A V`` are computed by temporal decomposition (:func:`spike_matmul`): every term is a spike
  times an integer count; NReLU's constant ``c`` and the amplitudes of both operands are folded into the
  threshold of the IF neuron that reads the product: ``theta_A T / (c theta_Q theta_K)``;
- max-pooling of spike counts is the increments of a running maximum (:func:`spike_maxpool2d`);
- the residual stream is a sum of synaptic currents; the head is linear, so its ``T`` per-step outputs
  averaged equal one product of its (folded) weights with the spike counts accumulated over ``T`` steps.

The first convolution receives the analog input: a static image is the same input current at every step
(computed once, as in every direct-encoding SNN), an event tensor ``[T, B, C, H, W]`` gives one frame per step.
With ``T = L`` and full delay (``d >= T - 1``) the logits equal the quantized ANN's; every stream lies in a ``T``-step
window (``bestformer.neurons.integrate_fire``), and the output window of the last neuron ends at step
:attr:`SpikingCSD.latency`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...layers import ConvBN, LinearBN, ResidualBlock, merge_heads, split_heads
from ...layers.decompose import SpikeMaxPool2d, spike_matmul
from ...layers.fold import fold_bn
from ...neurons import IFNeuron
from ...neurons.integrate_fire import check_delay
from ...quant import QuantReLU
from ..base import BaseModel
from .ann import CSDMLP, CSDStemStage, CSDTransformer, NReLUAttention


def _theta(act: QuantReLU) -> Tensor:
    return act.threshold().detach()


def _neuron(act: QuantReLU, delay: int) -> IFNeuron:
    return IFNeuron(_theta(act), delay)


@torch.no_grad()
def folded_linear(layer: LinearBN, amplitude: Tensor) -> nn.Linear:
    """``nn.Linear`` computing ``BN(W (amplitude * s))`` for spikes ``s``: BN and the spike amplitude folded."""
    w, b = fold_bn(layer.linear.quantized_weight(), layer.linear.bias, layer.bn)
    out = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    out.weight.copy_(w * amplitude)
    out.bias.copy_(b)
    return out.requires_grad_(False)


@torch.no_grad()
def folded_conv(layer: ConvBN, amplitude: Tensor | None) -> nn.Conv2d:
    """``nn.Conv2d`` computing ``BN(conv(amplitude * s))`` (``amplitude=None``: analog input)."""
    conv = layer.conv
    w, b = fold_bn(conv.quantized_weight(), conv.bias, layer.bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    out.weight.copy_(w if amplitude is None else w * amplitude)
    out.bias.copy_(b)
    return out.requires_grad_(False)


class SpikingStemStage(nn.Module):
    """Converted tokenizer stage: ``Conv (BN folded) -> IF -> [spike max-pool]`` over ``[T, B, C, H, W]``.

    An input with one step (a static image at the first stage) is one constant current, expanded over ``T``.
    """

    def __init__(self, ann: CSDStemStage, amplitude: Tensor | None, time_steps: int, delay: int) -> None:
        super().__init__()
        self.time_steps = time_steps
        self.conv = folded_conv(ann.conv, amplitude)
        self.neuron = _neuron(ann.act, delay)
        self.pool = SpikeMaxPool2d() if ann.pool is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.flatten(0, 1))
        y = y.view(*x.shape[:2], *y.shape[1:]).expand(self.time_steps, -1, -1, -1, -1)
        s = self.neuron(y)
        return s if self.pool is None else self.pool(s)


class SpikingNReLUAttention(nn.Module):
    """Converted NReLU attention: IF neurons, ``Q K^T`` and ``A V`` by temporal decomposition.

    ``s = IF(x)``; ``Q, K, V = IF(W s)``; ``A = IF(sum-decomposition of Q K^T)`` with NReLU's constant in its
    threshold; ``O = IF(decomposition of A V)``; ``out = W_o O`` (a current added to the residual stream).
    """

    def __init__(self, ann: NReLUAttention, time_steps: int, delay: int) -> None:
        super().__init__()
        self.heads = ann.heads
        self.in_neuron = _neuron(ann.in_act, delay)
        amp = _theta(ann.in_act)
        self.q, self.k, self.v = (folded_linear(m, amp) for m in (ann.q, ann.k, ann.v))
        self.q_neuron, self.k_neuron, self.v_neuron = (_neuron(a, delay) for a in (ann.q_act, ann.k_act, ann.v_act))
        tq, tk, tv, ta = (_theta(a) for a in (ann.q_act, ann.k_act, ann.v_act, ann.attn_act))
        self.attn_neuron = IFNeuron(ta * time_steps / (ann.attn_act.scale * tq * tk), delay)
        self.out_neuron = IFNeuron(_theta(ann.out_act) * time_steps / (ta * tv), delay)
        self.proj = folded_linear(ann.proj, _theta(ann.out_act))

    def forward(self, x: Tensor) -> Tensor:
        s = self.in_neuron(x)
        q = split_heads(self.q_neuron(self.q(s)), self.heads)
        k = split_heads(self.k_neuron(self.k(s)), self.heads)
        v = split_heads(self.v_neuron(self.v(s)), self.heads)
        a = self.attn_neuron(spike_matmul(q, k.transpose(-1, -2)))
        return self.proj(merge_heads(self.out_neuron(spike_matmul(a, v))))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class SpikingCSDMLP(nn.Module):
    """Converted MLP: ``IF -> W1 -> IF -> W2`` (BN and spike amplitudes folded)."""

    def __init__(self, ann: CSDMLP, delay: int) -> None:
        super().__init__()
        self.in_neuron = _neuron(ann.in_act, delay)
        self.fc1 = folded_linear(ann.fc1, _theta(ann.in_act))
        self.hidden_neuron = _neuron(ann.hidden_act, delay)
        self.fc2 = folded_linear(ann.fc2, _theta(ann.hidden_act))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden_neuron(self.fc1(self.in_neuron(x))))


class SpikingCSD(BaseModel):
    """The spike-driven model converted from a ``csd_*`` ANN (module docstring); build it with
    :func:`bestformer.convert.convert`.

    Same contract as the library's models: ``forward(x)`` gives logits, ``forward_features(x)`` the spike
    counts ``[B, 1, D]`` of the final neurons summed over tokens and the ``T`` steps, ``forward_head(feats,
    pre_logits=True)`` the ANN-equivalent features; ``time_steps`` is ``T``; input ``[B, C, H, W]`` images or
    ``[T, B, C, H, W]`` frames. Inference only: its weights do not require gradients.
    """

    @torch.no_grad()
    def __init__(self, ann: CSDTransformer, time_steps: int, delay: int) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.img_size = ann.num_classes, ann.in_channels, ann.img_size
        self.num_features, self.embed_dim, self.levels = ann.num_features, ann.embed_dim, ann.levels
        self.num_tokens = ann.num_tokens
        self.time_steps, self.delay = time_steps, delay
        self.stem = nn.ModuleList()
        amplitude = None  # the first convolution reads the analog input
        for stage in ann.stem:
            self.stem.append(SpikingStemStage(stage, amplitude, time_steps, delay))
            amplitude = _theta(stage.act)
        self.register_buffer("stem_amplitude", amplitude)
        self.blocks = nn.ModuleList(
            ResidualBlock(SpikingNReLUAttention(blk.attn, time_steps, delay), SpikingCSDMLP(blk.mlp, delay))
            for blk in ann.blocks
        )
        self.final_neuron = _neuron(ann.final_act, delay)
        # counts summed over N tokens and T steps -> the ANN's token-averaged activation
        self.register_buffer("feature_scale", _theta(ann.final_act) / (self.num_tokens * time_steps))
        self.head: nn.Linear | None = None
        if isinstance(ann.head, nn.Linear):
            self.head = nn.Linear(ann.head.in_features, ann.head.out_features, device=ann.head.weight.device,
                                  dtype=ann.head.weight.dtype).requires_grad_(False)
            self.head.weight.copy_(ann.head.weight * self.feature_scale)
            self.head.bias.copy_(ann.head.bias)

    @property
    def neuron_depth(self) -> int:
        """IF layers on the longest path: one per tokenizer stage, six per block (input, Q/K, attention map,
        attention output; MLP input, MLP hidden), the final one."""
        return len(self.stem) + 6 * len(self.blocks) + 1

    @property
    def latency(self) -> int:
        """Time steps from the first input to the last output spike: ``T + d * neuron_depth``."""
        return self.time_steps + self.delay * self.neuron_depth

    def forward_features(self, x: Tensor) -> Tensor:
        self.check_input(x)
        s = x.unsqueeze(0) if x.dim() == 4 else x
        for stage in self.stem:
            s = stage(s)
        h = s.flatten(3).transpose(-1, -2) * self.stem_amplitude  # tokens [T, B, N, D], currents
        for blk in self.blocks:
            h = blk(h)
        return self.final_neuron(h).sum(dim=(0, 2)).unsqueeze(1)

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        counts = feats.sum(dim=1)
        if pre_logits or self.head is None:
            return counts * self.feature_scale
        return self.head(counts)

    def _make_head(self, num_classes: int) -> nn.Module:
        raise ConfigError("a converted model's head is its ANN's: reset_classifier on the csd_* ANN, train it, "
                          "then convert")

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, delay={self.delay}, latency={self.latency}"


def convert(ann: nn.Module, time_steps: int | None = None, delay: int | None = None) -> SpikingCSD:
    """Convert a CSDformer ANN into a :class:`SpikingCSD` (BatchNorm folded with its running statistics,
    quantized ReLUs to IF/DIF neurons, products and max-pooling by temporal decomposition).

    Args:
        ann: a ``csd_*`` model (:class:`CSDTransformer`), normally trained.
        time_steps: ``T``; default ``L`` (the ANN's ``levels``), the exact setting.
        delay: ``d`` of the DIF neurons, from 0 (plain IF) to ``T``; default ``T`` (exact).

    The result is in eval mode, does not require gradients and keeps ``model_name`` with ``model_args`` plus
    ``spiking={"time_steps": T, "delay": d}``, so ``save_checkpoint`` / ``load_checkpoint`` rebuild it.
    """
    if isinstance(ann, SpikingCSD):
        raise ConfigError("this model is already a converted spiking model; convert the csd_* ANN it came from")
    if not isinstance(ann, CSDTransformer):
        name = getattr(ann, "model_name", type(ann).__name__)
        raise ConfigError(f"convert needs a CSDformer ANN (a csd_* model such as csd_tiny), got {name!r}")
    steps = ann.levels if time_steps is None else time_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"time_steps must be an integer >= 1, got {steps!r}")
    d = check_delay(steps if delay is None else delay, steps)
    snn = SpikingCSD(ann, steps, d).eval()
    if hasattr(ann, "model_name"):
        snn.model_name = ann.model_name
        snn.model_args = {**ann.model_args, "spiking": {"time_steps": steps, "delay": d}}
    return snn
