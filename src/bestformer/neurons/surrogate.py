"""Surrogate gradients: a Heaviside step forward, the derivative of a smooth primitive backward.

Each surrogate is a small class with a sharpness ``alpha`` (SpikingJelly's convention). The backward is
written once, in :meth:`Surrogate.derivative`, and tests check it against a finite difference of
:meth:`Surrogate.primitive`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, check_choice


class _SpikeFunction(torch.autograd.Function):
    """``S = H(x) = 1[x >= 0]`` with the pseudo-gradient ``dS/dx = surrogate.derivative(x)``. Written with a
    separate ``setup_context`` so that ``torch.func`` transforms (grad, vjp, vmap) accept it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, surrogate: Surrogate) -> Tensor:
        return (x >= 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Surrogate], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.surrogate = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.derivative(x), None


class Surrogate:
    """Base class: ``surrogate(x)`` fires where ``x >= 0`` and back-propagates ``derivative(x)``."""

    name: ClassVar[str] = ""

    def __init__(self, alpha: float) -> None:
        if not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"surrogate alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def primitive(self, x: Tensor) -> Tensor:
        """The smooth function whose derivative is the pseudo-gradient."""
        raise NotImplementedError

    def derivative(self, x: Tensor) -> Tensor:
        """The pseudo-gradient ``d primitive / dx``."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return _SpikeFunction.apply(x, self)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.alpha == self.alpha  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, self.alpha))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha:g})"


class Sigmoid(Surrogate):
    """``g(x) = sigmoid(alpha x)``, ``g'(x) = alpha sigmoid(alpha x) (1 - sigmoid(alpha x))``.

    The reference BESTformer/Spikformer code uses it with ``alpha = 4``.
    """

    name = "sigmoid"

    def __init__(self, alpha: float = 4.0) -> None:
        super().__init__(alpha)

    def primitive(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.alpha * x)

    def derivative(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.alpha * x)
        return self.alpha * s * (1.0 - s)


class ATan(Surrogate):
    """``g(x) = atan(pi/2 alpha x) / pi + 1/2``, ``g'(x) = alpha / 2 / (1 + (pi/2 alpha x)^2)``
    (SpikingJelly's default surrogate, Fang et al. 2021)."""

    name = "atan"

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__(alpha)

    def primitive(self, x: Tensor) -> Tensor:
        return torch.atan(math.pi / 2 * self.alpha * x) / math.pi + 0.5

    def derivative(self, x: Tensor) -> Tensor:
        return self.alpha / 2 / (1 + (math.pi / 2 * self.alpha * x) ** 2)


SURROGATES: dict[str, type[Surrogate]] = {cls.name: cls for cls in (Sigmoid, ATan)}


def get_surrogate(spec: str | Surrogate | dict[str, Any] | None, alpha: float | None = None) -> Surrogate:
    """Resolve a surrogate from an instance, a name (``"sigmoid"``, ``"atan"``) or a ``config()`` dict (``None``:
    the default sigmoid); ``alpha`` sets a named one's sharpness and must agree with an instance's."""
    if spec is None:
        spec = "sigmoid"
    if isinstance(spec, Surrogate):
        if alpha is not None and alpha != spec.alpha:
            raise ConfigError(f"alpha={alpha} was given with a {type(spec).__name__} surrogate of alpha={spec.alpha}; "
                              "set alpha on the surrogate itself")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name")
        return get_surrogate(name, spec.get("alpha", alpha))
    cls = SURROGATES[check_choice("surrogate", spec, SURROGATES)]
    return cls() if alpha is None else cls(alpha)
