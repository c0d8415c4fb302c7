"""Binary spiking MLP (BMLP of Eq. 12)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .basic import LinearBN


class SpikingMLP(nn.Module):
    """``neuron -> W1 (D -> hD) -> BN -> neuron -> W2 (hD -> D) -> BN`` on tokens ``[T, B, N, D]``."""

    def __init__(self, dim: int, hidden: int, neuron_layer: Callable[..., nn.Module],
                 weight_bits: int | str | None = 1) -> None:
        super().__init__()
        self.neuron1 = neuron_layer()
        self.fc1 = LinearBN(dim, hidden, weight_bits)
        self.neuron2 = neuron_layer()
        self.fc2 = LinearBN(hidden, dim, weight_bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.neuron2(self.fc1(self.neuron1(x))))
