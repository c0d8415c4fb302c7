"""Layers of QSD-Transformer (Li et al., ICLR 2025): the Spike-driven Transformer v2 "MetaFormer" blocks with
b-bit LSQ weights, IE-LIF neurons and Q-SDSA. Every tensor is time-first and spatial, ``[T, B, C, H, W]``.

From the authors' code (SPEC.md): separable-conv blocks in the convolutional stages; ``q, k, v = IE-LIF(BN(
Conv(x)))`` with a re-parameterisable conv; ``out = (q (k^T v)) * 0.25 -> attention neuron (levels / 2) ->
Conv + BN``; layer-scale (initialised to 1e-6) on both residual branches. From the paper's figure: the
rectification before the q/k/v neurons (its formula is ours: :class:`~bestformer.neurons.multilevel.Rectify`).

Ours: (1) :class:`RepConvBN` pads the input spikes with zeros instead of padding the inner BatchNorm's
output with that BatchNorm's shift (the code's ``BNAndPadLayer``): the same function at inference, exactly
re-parameterisable into one 3x3 convolution on spikes plus a bias, without a special layer; (2) no bias on
a convolution that a BatchNorm follows (the BatchNorm's shift absorbs it); (3) one BatchNorm after each
q/k/v/projection conv (the code stacks a second one, which folds into the first); (4) an option of Q-SDSA
to average ``k^T v`` over the tokens (``token_mean=True``, off by default: the code's sum; :class:`QSDSA`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..quant import QuantConv2d, bits_to_quantizer
from .attention import merge_heads, split_heads
from .basic import ConvBN
from .deploy_form import FoldedConv2d
from .fold import fold_bn
from .mlp import SpikingMLP


def per_step(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a module on ``[N, C, H, W]`` to every step of ``[T, B, C, H, W]``."""
    y = module(x.flatten(0, 1))
    return y.view(*x.shape[:2], *y.shape[1:])


def to_tokens(x: Tensor) -> Tensor:
    """``[T, B, C, H, W] -> [T, B, N, C]``."""
    return x.flatten(3).transpose(-1, -2)


def from_tokens(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[T, B, N, C] -> [T, B, C, H, W]``."""
    return x.transpose(-1, -2).reshape(*x.shape[:2], x.shape[-1], *hw)


def _conv_bn_affine(layer: ConvBN) -> tuple[Tensor, Tensor]:
    """A 1x1 :class:`ConvBN` in evaluation mode as ``(W [out, in], b [out])``: quantized weight, BN folded."""
    conv = layer.conv
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise InputError(f"only a dense 1x1 stride-1 convolution folds here, got {conv}")
    w, b = fold_bn(conv.quantized_weight(), conv.bias, layer.bn)
    return w.flatten(1), b


class RepConvBN(nn.Module):
    """``pad(1) -> Conv1x1 -> BN -> depthwise Conv3x3 -> Conv1x1 -> BN`` (the code's ``RepConv``), all LSQ.

    At inference the chain folds into one dense 3x3 convolution on the (zero-padded) input spikes plus a
    per-channel bias, so q/k/v stay spike-driven; during training its factorisation costs ``2 C^2 + 9 C``
    weights instead of ``9 C^2``.
    """

    def __init__(self, in_channels: int, out_channels: int, weight_bits: int | str | None = 4) -> None:
        super().__init__()
        self.expand = ConvBN(in_channels, in_channels, weight_bits, kernel_size=1)
        self.dw = QuantConv2d(in_channels, in_channels, 3, groups=in_channels, bias=False,
                              weight_quantizer=bits_to_quantizer(weight_bits))
        self.pw = ConvBN(in_channels, out_channels, weight_bits, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(F.pad(x, (1, 1, 1, 1)))
        return self.pw(per_step(self.dw, y))

    @torch.no_grad()
    def deploy_form(self) -> FoldedConv2d:
        """The evaluation-mode chain as one dense 3x3 convolution (padding 1) with bias on the input spikes
        (the re-parameterisation of the code's ``RepConv``, which Spike-driven Transformer v2 and
        QSD-Transformer fold before inference), applied to every time step like this module.

        With ``A, b1`` the first 1x1 convolution with its BatchNorm folded (:func:`~bestformer.layers.fold.fold_bn`,
        quantized weights, running statistics), ``D`` the depthwise 3x3 and ``P, b2`` the last 1x1 with its
        BatchNorm: the first stage gives ``A x~ + b1`` at every position of the zero-padded input ``x~``, its
        border included (where ``x~ = 0``), so ``W[o, i, u, v] = sum_c P[o, c] D[c, u, v] A[c, i]`` and
        ``bias = P (b1 * sum_uv D) + b2``: exact, because the input (not the BatchNorm output) is zero-padded.
        The folded convolution declares the weight bits of the layers it replaces (``weight_bits``).
        """
        dw = self.dw
        if dw.kernel_size != (3, 3) or dw.padding != (0, 0) or dw.stride != (1, 1) or dw.groups != dw.in_channels:
            raise InputError(f"RepConvBN folds a depthwise 3x3 without padding, got {dw}")
        a, b1 = _conv_bn_affine(self.expand)
        p, b2 = _conv_bn_affine(self.pw)
        d = dw.quantized_weight()[:, 0]  # [C, 3, 3]
        mid = b1 * d.sum(dim=(1, 2)) + (dw.bias if dw.bias is not None else 0.0)
        weight = torch.einsum("oc,cuv,ci->oiuv", p, d, a)
        conv = FoldedConv2d(a.shape[1], p.shape[0], 3, padding=1, bias=True,
                            weight_bits=max(self.expand.conv.weight_bits, dw.weight_bits, self.pw.conv.weight_bits),
                            device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(p @ mid + b2)
        return conv


class SepConv(nn.Module):
    """Inverted separable convolution (MobileNetV2 style, as Spike-driven Transformer v2):
    ``neuron -> Conv1x1 (C -> 2C) -> BN -> neuron -> depthwise Conv7x7 -> Conv1x1 (2C -> C) -> BN``."""

    def __init__(self, dim: int, neuron_layer: Callable[..., nn.Module], weight_bits: int | str | None = 4,
                 expansion: int = 2, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = expansion * dim
        self.neuron1 = neuron_layer()
        self.pw1 = ConvBN(dim, hidden, weight_bits, kernel_size=1)
        self.neuron2 = neuron_layer()
        self.dw = QuantConv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False,
                              weight_quantizer=bits_to_quantizer(weight_bits))
        self.pw2 = ConvBN(hidden, dim, weight_bits, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.neuron2(self.pw1(self.neuron1(x)))
        return self.pw2(per_step(self.dw, y))

    @torch.no_grad()
    def deploy_form(self) -> FoldedSepConv:
        """Evaluation-mode form: ``neuron1 -> pw1 -> neuron2`` unchanged (the same modules), then the depthwise
        ``k x k`` and the last 1x1 with its BatchNorm as one dense ``k x k`` convolution (hidden -> dim) with
        bias on the spikes of ``neuron2`` (the re-parameterisation of Spike-driven Transformer v2's separable
        convolution, as the code's ``RepConv``): ``W[o, c, u, v] = P[o, c] D[c, u, v]``, ``bias = b2 + P b_dw``,
        with ``P, b2`` the 1x1 convolution's quantized weight with its BatchNorm folded
        (:func:`~bestformer.layers.fold.fold_bn`). Exact: the depthwise convolution zero-pads the spikes."""
        dw = self.dw
        if dw.groups != dw.in_channels or dw.in_channels != dw.out_channels:
            raise InputError(f"SepConv folds a depthwise convolution, got {dw}")
        p, b2 = _conv_bn_affine(self.pw2)
        d = dw.quantized_weight()[:, 0]  # [hidden, k, k]
        weight = p[:, :, None, None] * d[None]
        bias = b2 + (p @ dw.bias if dw.bias is not None else 0.0)
        conv = FoldedConv2d(p.shape[1], p.shape[0], dw.kernel_size, stride=dw.stride, padding=dw.padding,
                            dilation=dw.dilation, bias=True,
                            weight_bits=max(dw.weight_bits, self.pw2.conv.weight_bits),
                            device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return FoldedSepConv(self.neuron1, self.pw1, self.neuron2, conv)


class FoldedSepConv(nn.Module):
    """:meth:`SepConv.deploy_form`: ``neuron1 -> pw1 (ConvBN) -> neuron2 -> conv`` with ``conv`` the folded
    dense ``k x k`` convolution (a :class:`~bestformer.layers.deploy_form.FoldedConv2d`) on spikes."""

    def __init__(self, neuron1: nn.Module, pw1: nn.Module, neuron2: nn.Module, conv: FoldedConv2d) -> None:
        super().__init__()
        self.neuron1, self.pw1, self.neuron2, self.conv = neuron1, pw1, neuron2, conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.neuron2(self.pw1(self.neuron1(x))))


class ConvBlock(nn.Module):
    """Convolutional MetaFormer block: ``x = x + SepConv(x)``, then
    ``x = x + BN(Conv3x3(neuron(BN(Conv3x3(neuron(x))))))`` with a hidden width ``mlp_ratio C``."""

    def __init__(self, dim: int, neuron_layer: Callable[..., nn.Module], weight_bits: int | str | None = 4,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.sepconv = SepConv(dim, neuron_layer, weight_bits)
        self.neuron1 = neuron_layer()
        self.conv1 = ConvBN(dim, hidden, weight_bits, kernel_size=3)
        self.neuron2 = neuron_layer()
        self.conv2 = ConvBN(hidden, dim, weight_bits, kernel_size=3)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.sepconv(x)
        return x + self.conv2(self.neuron2(self.conv1(self.neuron1(x))))


class Downsample(nn.Module):
    """``[neuron] -> Conv kxk / stride -> BN``; the first one (on the input image) has no neuron."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 neuron_layer: Callable[..., nn.Module] | None, weight_bits: int | str | None = 4) -> None:
        super().__init__()
        self.neuron = neuron_layer() if neuron_layer is not None else None
        self.conv = ConvBN(in_channels, out_channels, weight_bits, kernel_size=kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.neuron(x) if self.neuron is not None else x)


class QSDSA(nn.Module):
    """Quantized spike-driven self-attention (Q-SDSA) on ``[T, B, C, H, W]``.

    ``s = neuron(x)``; ``q, k, v = IE-LIF(Rectify(RepConvBN(s)))``; per head ``(q (k^T v)) * attn_scale``
    (``k^T v`` first: linear in the number of tokens), divided by the number of tokens ``N`` when
    ``token_mean``; head merge; attention neuron with amplitude 2 (the code's "levels / 2");
    ``RepConvBN`` projection. Every product has a multi-level spike as one operand (1-bit spikes over ``D``
    virtual steps at inference); both constants fold into the attention neuron's threshold.

    ``token_mean=False`` (the default) is the paper's formula and the authors' code: ``k^T v`` sums over all
    ``N`` tokens. ``token_mean=True`` is ours: with the rectified (dense) q/k/v every input of the attention
    neuron exceeds its saturation at initialisation (measured: 100 % on 8 x 8 digits, 64 tokens), so the
    attention output is a constant and its q/k/v convolutions get (almost) no gradient; averaging over tokens
    keeps it in range (0 % saturated at initialisation, 12 % after 30 steps).

    Args:
        dim, heads: width and number of heads. neuron_layer: IE-LIF factory (``ReLU`` for the ANN teacher).
        weight_bits: LSQ bits of the four convolutions. rectify: the rectification before q, k, v.
        attn_scale: the constant 0.25 of the code. token_mean: divide ``k^T v`` by the number of tokens.
    """

    def __init__(self, dim: int, heads: int, neuron_layer: Callable[..., nn.Module],
                 weight_bits: int | str | None = 4, rectify: bool = True, attn_scale: float = 0.25,
                 token_mean: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"width {dim} is not divisible by num_heads {heads}")
        self.heads, self.attn_scale, self.token_mean = heads, attn_scale, token_mean
        self.in_neuron = neuron_layer()
        self.q, self.k, self.v = (RepConvBN(dim, dim, weight_bits) for _ in range(3))
        qkv_neuron = (lambda: neuron_layer(rectify_channels=dim)) if rectify else neuron_layer
        self.q_neuron, self.k_neuron, self.v_neuron = qkv_neuron(), qkv_neuron(), qkv_neuron()
        self.attn_neuron = neuron_layer(amplitude=2.0)
        self.proj = RepConvBN(dim, dim, weight_bits)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Spiking ``q, k, v`` per head, ``[T, B, heads, N, d]`` (fine-grained distillation hooks the three
        neurons)."""
        s = self.in_neuron(x)
        return tuple(split_heads(to_tokens(neuron(conv(s))), self.heads)  # type: ignore[return-value]
                     for conv, neuron in ((self.q, self.q_neuron), (self.k, self.k_neuron), (self.v, self.v_neuron)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``(q (k^T v)) * attn_scale`` per head (``/ N`` with ``token_mean``)."""
        scale = self.attn_scale / k.shape[-2] if self.token_mean else self.attn_scale
        return (q @ (k.transpose(-1, -2) @ v)) * scale

    def forward(self, x: Tensor) -> Tensor:
        out = from_tokens(merge_heads(self.attend(*self.qkv(x))), x.shape[-2:])
        return self.proj(self.attn_neuron(out))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, attn_scale={self.attn_scale:g}, token_mean={self.token_mean}"


class QSDBlock(nn.Module):
    """Transformer MetaFormer block with layer-scale on both branches:
    ``x = x + ls1 * QSDSA(x)``, ``x = x + ls2 * MLP(x)`` (``ls`` per channel, initialised to 1e-6)."""

    def __init__(self, dim: int, heads: int, neuron_layer: Callable[..., nn.Module],
                 weight_bits: int | str | None = 4, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-6,
                 rectify: bool = True, attn_scale: float = 0.25, token_mean: bool = False) -> None:
        super().__init__()
        self.attn = QSDSA(dim, heads, neuron_layer, weight_bits, rectify, attn_scale, token_mean)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), neuron_layer, weight_bits)  # 1x1 convs on tokens
        self.layer_scale1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.layer_scale2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x) * self.layer_scale1.view(-1, 1, 1)
        return x + from_tokens(self.mlp(to_tokens(x)), x.shape[-2:]) * self.layer_scale2.view(-1, 1, 1)
