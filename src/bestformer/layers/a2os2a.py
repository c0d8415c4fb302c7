"""A2OS2A, Accurate Addition-Only Spiking Self-Attention (Guo et al., CVPR 2025), as an attention form.

``O = SN((Q K^T) V)`` per head, token form, with three neuron types (the paper's point):

- ``Q = SN(BN(W_q s))``: binary spikes {0, 1} (the model's spiking neuron, LIF by default);
- ``K = ReLU(BN(W_k s))``: real values >= 0 (the ReLU branch);
- ``V = TN(BN(W_v s))``: ternary spikes {-1, 0, +1} (:class:`~bestformer.neurons.ternary.TernaryNeuron`).

No softmax and no scale [paper]. Every product then has a binary or ternary operand: ``Q K^T`` sums the
entries of ``K`` selected by the spikes of ``Q``; ``(Q K^T) V`` adds or subtracts the entries of ``Q K^T``
selected by the ``+1`` / ``-1`` spikes of ``V``; the layer needs additions and subtractions only.

Ours, where the paper's method section was not available (SPEC.md): each branch is ``Linear -> BN ->
neuron`` on the spikes of an input neuron (as Spikformer); after the head merge, ``SN`` is the model's
neuron with threshold 0.5 (Spikformer's attention neuron), then ``Linear -> BN`` projects back; the
ternary variant is chosen by the attention name (``"a2os2a"``: Ternary Spike, ``"a2os2a_lif"``: the LIF
form).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..errors import InputError
from ..neurons.ternary import TernaryNeuron
from .attention import SpikingSelfAttention, merge_heads, register_attention
from .basic import LinearBN

#: registered attention name -> ternary neuron variant of V
VARIANT_OF_ATTENTION = {"a2os2a": "ternary_spike", "a2os2a_lif": "lif"}


class A2OS2A(nn.Module):
    """Addition-only spiking self-attention on tokens ``[T, B, N, C]`` (module docstring).

    Args:
        dim: width ``C``; heads: number of heads (``C`` divisible by it).
        neuron_layer: factory of the binary spiking neuron (input, Q and output neurons).
        weight_bits: bits of the four projections (32: full precision, the A2OS2A models; 1: BESTformer).
        ternary_variant: ``"ternary_spike"`` (default) or ``"lif"`` for the V neuron.
        out_threshold: threshold of the output neuron ``SN`` (0.5).
    """

    def __init__(self, dim: int, heads: int, neuron_layer: Callable[..., nn.Module],
                 weight_bits: int | str | None = 32, ternary_variant: str = "ternary_spike",
                 out_threshold: float = 0.5) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.in_neuron = neuron_layer()
        self.q = LinearBN(dim, dim, weight_bits)
        self.k = LinearBN(dim, dim, weight_bits)
        self.v = LinearBN(dim, dim, weight_bits)
        self.q_neuron = neuron_layer()
        self.k_neuron = nn.ReLU()
        self.v_neuron = TernaryNeuron(ternary_variant)
        self.out_neuron = neuron_layer(v_threshold=out_threshold)
        self.proj = LinearBN(dim, dim, weight_bits)

    # the same three branches as Spikformer's attention (binary Q, ReLU K, ternary V differ by their neurons)
    qkv = SpikingSelfAttention.qkv

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``(Q K^T) V`` per head, ``[T, B, heads, N, d]``: no softmax, no scale."""
        return (q @ k.transpose(-1, -2)) @ v

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.out_neuron(merge_heads(self.attend(*self.qkv(x)))))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, ternary={self.v_neuron.params.variant}"


def a2os2a_factory(dim: int, heads: int, mode: str, time_steps: int, neuron_layer: Callable[..., nn.Module],
                   weight_bits: int | str | None, attn_scale: float) -> A2OS2A:
    """The registered attention factory (the call every model makes). ``mode`` is the registered name and
    selects the ternary variant; ``time_steps`` and ``attn_scale`` do not apply: A2OS2A has no per-step
    parameter and, by design, no scale."""
    return A2OS2A(dim, heads, neuron_layer, weight_bits, VARIANT_OF_ATTENTION[mode])


for _name in VARIANT_OF_ATTENTION:
    register_attention(_name, a2os2a_factory)
