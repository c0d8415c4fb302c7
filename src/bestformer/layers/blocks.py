"""Encoder blocks: the reversible coupling of Eq. 12-13 and the standard residual of Spikformer."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError


class ResidualBlock(nn.Module):
    """``x = x + Attn(x); x = x + MLP(x)`` (Spikformer's residual stream)."""

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class ReversibleBlock(nn.Module):
    """The reversible connection of Eq. 12::

        X0' = BSSA(X1) + (X0 + X1) / 2
        X1' = BMLP(X0') + (X1 + X0') / 2

    and its inverse, Eq. 13 (:meth:`inverse`), which reconstructs the block's inputs from its outputs.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        y0 = self.attn(x1) + (x0 + x1) / 2
        y1 = self.mlp(y0) + (x1 + y0) / 2
        return y0, y1

    def inverse(self, y0: Tensor, y1: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 13: ``X1 = 2 (X1' - BMLP(X0')) - X0'``, ``X0 = 2 (X0' - BSSA(X1)) - X1``.

        Eval mode only: in training BatchNorm normalises each call by its own batch's statistics (so the
        sub-layers are not the functions the forward applied) and would update its running statistics again.
        """
        if self.training:
            raise ConfigError("ReversibleBlock.inverse needs eval mode (call .eval()): in training mode BatchNorm "
                              "uses each call's batch statistics, so Eq. 13 would not invert the forward")
        x1 = 2 * (y1 - self.mlp(y0)) - y0
        x0 = 2 * (y0 - self.attn(x1)) - x1
        return x0, x1
