"""Straight-through estimators (STE, Bengio et al. 2013): a non-differentiable forward with the gradient of a
differentiable proxy, the one helper behind every quantizer and every straight-through spiking neuron.

Larq's pattern: an :class:`STE` object owns both halves, its forward (:meth:`STE.quantize`) and its
pseudo-gradient (the derivative of :meth:`STE.proxy`). All of them compute ``proxy + (value - proxy).detach()``
(:func:`straight_through`), the form every user had before, so forward values and gradients are unchanged.

- :data:`ste_round`, :data:`ste_floor`: ``round`` / ``floor`` forward, identity gradient (LSQ; QCFS's quantized
  ReLU, :class:`~bestformer.quant.QuantReLU`).
- :data:`ste_sign`: Eq. 6's ``+1 if x >= 0 else -1`` forward, identity gradient (the 1-bit weights, Eq. 5-6).
- :class:`MultiLevelSTE`: the IE-LIF spike ``floor(D clamp(u, 0, 1) + 1/2) / D`` through ``clamp(u, 0, 1)``.
- :class:`TernarySTE`: the Ternary Spike ``sign(h) 1[|h| >= theta]`` through ``clamp(h / V_th, -1, 1)``.
- :func:`scale_grad`: identity forward, gradient times ``g`` (LSQ's step-size gradient scale).
"""

from __future__ import annotations

import torch
from torch import Tensor


def straight_through(value: Tensor, proxy: Tensor) -> Tensor:
    """``value`` forward, ``d proxy`` backward: ``proxy + (value - proxy).detach()``."""
    return proxy + (value - proxy).detach()


def scale_grad(x: Tensor, g: float) -> Tensor:
    """Identity forward, gradient multiplied by ``g`` (LSQ's step-size gradient scale, Esser et al. 2020)."""
    return straight_through(x, x * g)


class STE:
    """A straight-through quantizer: ``q(x)`` returns ``quantize(x, proxy(x))`` with the gradient of ``proxy(x)``.

    Subclasses define :meth:`quantize` and, when the pseudo-gradient is not the identity, :meth:`proxy`.
    ``quantize`` gets the proxy too, so a forward built on it (a clamp, say) is computed once.
    """

    def proxy(self, x: Tensor) -> Tensor:
        """The differentiable stand-in whose gradient is back-propagated (default: ``x``, identity gradient)."""
        return x

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        """The forward value (not differentiated)."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        p = self.proxy(x)
        return straight_through(self.quantize(x, p), p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundSTE(STE):
    """``round(x)`` (half to even) forward, identity gradient."""

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        return torch.round(x)


class FloorSTE(STE):
    """``floor(x)`` forward, identity gradient."""

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        return torch.floor(x)


class SignSTE(STE):
    """Eq. 6's sign, ``+1 if x >= 0 else -1`` (exactly 0 maps to +1, unlike ``torch.sign``), identity gradient."""

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class MultiLevelSTE(STE):
    """``D + 1`` levels in ``[0, 1]``: ``floor(D clamp(u, 0, 1) + 1/2) / D`` (round half up, as the QSD-Transformer
    code), straight through ``clamp(u, 0, 1)`` (gradient 1 inside ``(0, 1)``, 0 outside)."""

    def __init__(self, levels: int) -> None:
        self.levels = levels

    def proxy(self, x: Tensor) -> Tensor:
        return torch.clamp(x, 0.0, 1.0)

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        return torch.floor(proxy * self.levels + 0.5) / self.levels

    def __repr__(self) -> str:
        return f"MultiLevelSTE(levels={self.levels})"


class TernarySTE(STE):
    """``sign(h) 1[|h| >= theta]`` in {-1, 0, 1}, straight through ``clamp(h / V_th, -1, 1)`` (the Ternary Spike
    neuron, Guo et al. AAAI 2024: gradient ``1 / V_th`` where ``|h| <= V_th``)."""

    def __init__(self, v_threshold: float, theta: float) -> None:
        self.v_threshold, self.theta = v_threshold, theta

    def proxy(self, x: Tensor) -> Tensor:
        return torch.clamp(x / self.v_threshold, -1.0, 1.0)

    def quantize(self, x: Tensor, proxy: Tensor) -> Tensor:
        return torch.sign(x) * (x.abs() >= self.theta).to(x.dtype)

    def __repr__(self) -> str:
        return f"TernarySTE(v_threshold={self.v_threshold:g}, theta={self.theta:g})"


#: ``round`` / ``floor`` / Eq. 6's sign forward, identity gradient
ste_round = RoundSTE()
ste_floor = FloorSTE()
ste_sign = SignSTE()
