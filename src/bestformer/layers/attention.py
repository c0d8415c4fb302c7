"""Spiking self-attention variants, selected by name (``attention=...`` on every model).

- ``"token"``: BESTformer's Binary Spiking Self-Attention, Eq. 8-9: ``Attn = Q K^T`` binarized over time by
  a soft-reset LIF, then ``lambda * scale * (B_Attn V)`` (used on CIFAR / DVS).
- ``"channel"``: the same binarization applied to ``K^T V`` (``d x d`` per head, linear in ``N``), then
  ``lambda * scale * (Q B_KV)`` (the reference's ImageNet form).
- ``"ssa"``: Spikformer's spiking self-attention, ``scale * Q K^T V`` with an integer attention map.

Other modules register more forms with :func:`register_attention` (e.g. ``"a2os2a"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError, check_choice
from .basic import LinearBN


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[T, B, N, C] -> [T, B, heads, N, C / heads]``."""
    t, b, n, c = x.shape
    return x.view(t, b, n, heads, c // heads).transpose(2, 3)


def merge_heads(x: Tensor) -> Tensor:
    """``[T, B, heads, N, d] -> [T, B, N, heads * d]``."""
    t, b, h, n, d = x.shape
    return x.transpose(2, 3).reshape(t, b, n, h * d)


class SpikingSelfAttention(nn.Module):
    """Spiking self-attention with binary (or any-bit) projections.

    ``x -> neuron -> Q, K, V = neuron(BN(W x)) -> attention map -> merge heads -> neuron(V_th 0.5)
    -> W_o -> BN``. Input and output are real-valued tokens ``[T, B, N, C]``.

    Args:
        dim: embedding width ``C``; heads: number of heads (``C`` divisible by it).
        mode: ``"token"``, ``"channel"`` or ``"ssa"`` (module docstring).
        time_steps: ``T``; the learnable lambda of Eq. 9 has shape ``[T, 1, heads, 1, 1]`` (initialised to 1).
        neuron_layer: factory of the spiking neuron (``LIF`` or ``ReLU`` for ANN counterparts).
        weight_bits: bits of the four projections (1: BESTformer, 32: full precision).
        attn_scale: the constant factor of the reference (0.125 = 1/8), folded into thresholds at deployment.
        attn_threshold: threshold of the soft-reset LIF that binarizes the attention map (Eq. 9, 1.0).
        out_threshold: threshold of the neuron after the head merge (0.5 in the reference).
    """

    def __init__(self, dim: int, heads: int, mode: str, time_steps: int,
                 neuron_layer: Callable[..., nn.Module], weight_bits: int | str | None = 1,
                 attn_scale: float = 0.125, attn_threshold: float = 1.0, out_threshold: float = 0.5) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.mode = check_choice("attention", mode, ("token", "channel", "ssa"))
        self.heads = heads
        self.time_steps = time_steps
        self.attn_scale = attn_scale
        self.in_neuron = neuron_layer()
        self.q = LinearBN(dim, dim, weight_bits)
        self.k = LinearBN(dim, dim, weight_bits)
        self.v = LinearBN(dim, dim, weight_bits)
        self.q_neuron, self.k_neuron, self.v_neuron = neuron_layer(), neuron_layer(), neuron_layer()
        if mode != "ssa":
            # Eq. 9: SR-LIF binarizes the integer map over time; lambda is folded into its threshold later.
            self.attn_neuron = neuron_layer(reset="soft", v_threshold=attn_threshold)
            self.lam = nn.Parameter(torch.ones(time_steps, 1, heads, 1, 1))
        self.out_neuron = neuron_layer(v_threshold=out_threshold)
        self.proj = LinearBN(dim, dim, weight_bits)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Spiking ``Q, K, V`` per head, ``[T, B, heads, N, d]`` (also used by fine-grained distillation)."""
        s = self.in_neuron(x)
        q = split_heads(self.q_neuron(self.q(s)), self.heads)
        k = split_heads(self.k_neuron(self.k(s)), self.heads)
        v = split_heads(self.v_neuron(self.v(s)), self.heads)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention product of the chosen mode, per head, ``[T, B, heads, N, d]``."""
        if self.mode == "ssa":
            return (q @ k.transpose(-1, -2)) @ v * self.attn_scale
        if q.shape[0] > self.lam.shape[0]:
            raise InputError(
                f"attention was built for time_steps={self.lam.shape[0]} (lambda of Eq. 9 is per step), "
                f"got T={q.shape[0]}"
            )
        # fewer steps than built (a time-step schedule's early phase): the first T lambdas
        scale = self.lam[: q.shape[0]] * self.attn_scale
        if self.mode == "token":
            return (self.attn_neuron(q @ k.transpose(-1, -2)) @ v) * scale  # Eq. 8-9
        return (q @ self.attn_neuron(k.transpose(-1, -2) @ v)) * scale

    def forward(self, x: Tensor) -> Tensor:
        out = merge_heads(self.attend(*self.qkv(x)))
        return self.proj(self.out_neuron(out))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, heads={self.heads}, attn_scale={self.attn_scale:g}"


AttentionFactory = Callable[..., nn.Module]
_ATTENTIONS: dict[str, AttentionFactory] = {}


def register_attention(name: str, factory: AttentionFactory) -> None:
    """Register an attention form: ``factory(dim, heads, mode, time_steps, neuron_layer, weight_bits)``."""
    _ATTENTIONS[name] = factory


def get_attention(name: str) -> AttentionFactory:
    return _ATTENTIONS[check_choice("attention", name, _ATTENTIONS)]


for _mode in ("token", "channel", "ssa"):
    register_attention(_mode, SpikingSelfAttention)
