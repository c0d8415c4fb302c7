"""Weight quantizers as objects (larq's pattern): each owns its forward, its pseudo-gradient and its
``precision`` (bits per weight), has a serializable ``config()`` and a string alias.

- :class:`SignBinarizer` (alias ``"binary"``): BESTformer's 1-bit weights, Eq. 5-6 (IR-Net's
  balanced, standardized sign).
- :class:`LSQQuantizer` (aliases ``"lsq2"`` ... ``"lsq8"``; ``"lsq2c"`` ... with per-channel step initialisation):
  b-bit learned-step-size quantization (Esser et al., ICLR 2020), as in the QSD-Transformer code.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .ste import scale_grad, ste_round, ste_sign

#: weight bit-widths that mean "full precision" (no quantizer)
FULL_PRECISION_BITS = (16, 32)


def _per_channel_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


class Quantizer(nn.Module):
    """Base class. ``forward(w)`` returns the quantized weight (in the float dtype of ``w``) with the
    quantizer's pseudo-gradient; :meth:`codes` returns the integers a deployment file stores."""

    alias: ClassVar[str] = ""
    precision: int = 32

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """Integer codes and the per-channel scale such that ``forward(w) == codes * scale``
        (scale ``None`` means 1)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.alias, "precision": self.precision}

    def extra_repr(self) -> str:
        return f"precision={self.precision}"


class SignBinarizer(Quantizer):
    """1-bit weights of BESTformer, Eq. 5-6 (from IR-Net, Qin et al. 2020).

    Per output channel: ``W^ = W - mean(W)``, ``W^std = W^ / std(W^)`` (unbiased std, as the reference),
    ``B = +1 if W^std >= 0 else -1`` (the paper's Eq. 6: exactly 0 maps to +1, unlike ``torch.sign``).
    No scaling factor: the BatchNorm that follows restores the magnitude. Backward: identity
    straight-through estimator to ``W^std``, and through the mean and std to ``W``.
    """

    alias = "binary"
    precision = 1

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def standardize(self, w: Tensor) -> Tensor:
        """Eq. 5: zero mean and unit (unbiased) standard deviation per output channel."""
        dims = _per_channel_dims(w)
        w_hat = w - w.mean(dim=dims, keepdim=True)
        if w[0].numel() == 1:  # one weight per channel: W^ is 0 (B = +1), and an unbiased std is undefined
            return w_hat
        return w_hat / (w_hat.std(dim=dims, keepdim=True) + self.eps)

    def forward(self, w: Tensor) -> Tensor:
        return ste_sign(self.standardize(w))  # Eq. 6, straight through to W^std

    def codes(self, w: Tensor) -> tuple[Tensor, None]:
        with torch.no_grad():
            return torch.where(self.standardize(w) >= 0, 1, -1).to(torch.int8), None


class LSQQuantizer(Quantizer):
    """b-bit learned step size quantization, one step per output channel.

    ``w_q = s * round(clamp(w / s, -2^(b-1), 2^(b-1) - 1))`` with a straight-through round; ``s`` is
    learned and its gradient scaled by ``1 / sqrt(numel * Qp)`` (the QSD-Transformer code's settings). Every
    channel's step starts at the layer-wide ``2 mean|W| / sqrt(Qp)``, as the authors' code does (at its first
    training forward; here from the weight the layer is built with, the same weight when training from scratch).
    ``per_channel_init=True`` (spec ``"lsq4c"``; ours before) starts each channel at its own ``2 mean|W_c| /
    sqrt(Qp)``.
    """

    def __init__(self, bits: int = 4, out_channels: int | None = None, weight: Tensor | None = None,
                 per_channel_init: bool = False) -> None:
        super().__init__()
        self.per_channel_init = bool(per_channel_init)
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"LSQ weight bits must be an integer from 2 to 8, got {bits!r}")
        self.precision = bits
        self.qn = -(2 ** (bits - 1))
        self.qp = 2 ** (bits - 1) - 1
        if weight is not None:
            out_channels = weight.shape[0]
        if out_channels is None:
            raise ConfigError("LSQQuantizer needs out_channels or the weight to initialise its step size")
        self.step = nn.Parameter(torch.ones(out_channels))
        if weight is not None:
            self.init_step(weight)

    @property
    def alias(self) -> str:  # type: ignore[override]
        return f"lsq{self.precision}" + ("c" if self.per_channel_init else "")

    @torch.no_grad()
    def init_step(self, w: Tensor) -> None:
        mean = w.abs().mean(dim=_per_channel_dims(w)) if self.per_channel_init else w.abs().mean()
        self.step.copy_((2 * mean / math.sqrt(self.qp)).clamp_min(1e-8).expand_as(self.step))

    def _step(self, w: Tensor) -> Tensor:
        g = 1.0 / math.sqrt(w.numel() * self.qp)
        shape = (-1,) + (1,) * (w.dim() - 1)
        return scale_grad(self.step, g).abs().clamp_min(1e-8).view(shape)

    def forward(self, w: Tensor) -> Tensor:
        s = self._step(w)
        return ste_round(torch.clamp(w / s, self.qn, self.qp)) * s

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            s = self._step(w)
            q = torch.round(torch.clamp(w / s, self.qn, self.qp)).to(torch.int8)
            return q, s.flatten()


_LSQ = re.compile(r"^lsq([2-8])(c?)$")


def bits_to_quantizer(bits: int | str | None) -> int | str | None:
    """A model's ``weight_bits`` option as a quantizer spec: ``None`` for full precision (``None``, 16, 32),
    anything else unchanged (resolved by :func:`get_weight_quantizer`)."""
    return None if bits is None or bits in FULL_PRECISION_BITS else bits


def get_weight_quantizer(spec: str | int | Quantizer | None, weight: Tensor | None = None) -> Quantizer | None:
    """Resolve a weight quantizer: ``None`` / ``32`` / ``16`` (full precision), ``1`` / ``"binary"``,
    ``2..8`` / ``"lsq2".."lsq8"`` (``"lsq2c".."lsq8c"``: per-channel step initialisation), or an instance.
    ``weight`` initialises data-dependent quantizers."""
    if spec is None or isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, bool):
        raise ConfigError(f"weight quantizer must be a bit-width or a name, got {spec!r}")
    if isinstance(spec, int):
        if spec in FULL_PRECISION_BITS:
            return None
        if spec == 1:
            return SignBinarizer()
        if 2 <= spec <= 8:
            return LSQQuantizer(spec, weight=weight)
        raise ConfigError(f"weight bits must be 1, 2-8, 16 or 32, got {spec}")
    if spec == "binary":
        return SignBinarizer()
    m = _LSQ.match(str(spec))
    if m:
        return LSQQuantizer(int(m.group(1)), weight=weight, per_channel_init=bool(m.group(2)))
    raise ConfigError(
        f"unknown weight quantizer {spec!r}; expected 'binary', 'lsq2'..'lsq8' ('lsq2c'..'lsq8c'), a bit-width "
        "or None"
    )
