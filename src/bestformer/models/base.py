"""The model contract every registered family keeps (timm's): one base class.

A model of this library takes images ``[B, C, H, W]`` or event frames ``[T, B, C, H, W]`` and returns logits.
Its parts, in timm's names:

- ``forward_features(x) -> [B, S, D]``: pooled features of ``S`` streams (2 for BESTformer's reversible
  encoder, Eq. 12; 1 otherwise), ``D = num_features``;
- ``forward_head(feats, pre_logits=False)``: logits (or, with ``pre_logits``, the pooled ``[B, D]``);
- ``forward(x) = forward_head(forward_features(x))``;
- ``reset_classifier(num_classes)``: a new head (0: none, ``forward`` returns features);
- ``check_input(x)``: one clear error for an input that does not fit (rank, channels, size, frames);
- the data options ``num_classes``, ``in_channels``, ``img_size``, ``time_steps`` as attributes.

A new family subclasses :class:`BaseModel`, implements ``forward_features`` and ``_make_head``, and registers its
sizes with :func:`bestformer.models.register_family` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..layers.memory import checkpoint_module


def check_positive_ints(**values: Any) -> None:
    """Raise one :class:`ConfigError` line for the first option that is not an integer >= 1."""
    for key, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {val!r}")


def check_num_classes(num_classes: Any) -> None:
    """``num_classes`` is an integer >= 0 (0: no head, the model returns features)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ConfigError(f"num_classes must be an integer >= 0 (0: no head, features), got {num_classes!r}")


def check_finite(positive: bool = False, **values: Any) -> None:
    """Raise one :class:`ConfigError` line for the first option that is not a finite real number (``> 0`` with
    ``positive``): a NaN scale would pass through the layers silently (a neuron reads NaN as "no spike")."""
    for key, val in values.items():
        if not (isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
                and (val > 0 or not positive)):
            raise ConfigError(f"{key} must be a finite number{' > 0' if positive else ''}, got {val!r}")


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (it reconciles the input's and the weights' dtypes)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def mlp_width(embed_dim: int, mlp_ratio: Any) -> int:
    """The hidden width ``int(embed_dim * mlp_ratio)`` of an MLP block, checked to be at least 1."""
    ok = isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool) and math.isfinite(mlp_ratio) \
        and int(embed_dim * mlp_ratio) >= 1
    if not ok:
        raise ConfigError(f"mlp_ratio must be a finite number with int(width x mlp_ratio) >= 1 (width {embed_dim}), "
                          f"got {mlp_ratio!r}")
    return int(embed_dim * mlp_ratio)


class BaseModel(nn.Module):
    """The shared contract (module docstring). Subclasses call :meth:`_set_data_options` first in ``__init__``,
    implement :meth:`forward_features` and :meth:`_make_head`, and set ``self.head``."""

    num_classes: int
    in_channels: int
    img_size: int
    time_steps: int
    num_features: int
    #: whether :meth:`set_grad_checkpointing` applies: the family runs its blocks through :meth:`_block`
    supports_grad_checkpointing = False
    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (timm's method): only the block
        inputs are kept; gradients and BatchNorm statistics are those of a plain step (tests check)."""
        if enable and not self.supports_grad_checkpointing:
            raise ConfigError(f"{type(self).__name__} does not support gradient checkpointing")
        self.grad_checkpointing = bool(enable)

    def _checkpointing(self) -> bool:
        """Whether this forward's blocks are recomputed in backward (checkpointing on and gradients taken)."""
        return self.grad_checkpointing and torch.is_grad_enabled()

    def _block(self, block: nn.Module, *inputs: Tensor) -> Any:
        """``block(*inputs)``, recomputed in backward when :meth:`_checkpointing`."""
        return checkpoint_module(block, *inputs) if self._checkpointing() else block(*inputs)

    def _set_data_options(self, num_classes: int, in_channels: int, img_size: int, time_steps: int,
                          **architecture: Any) -> None:
        """Check the data options (and any integer ``architecture`` options given) and keep the data options."""
        check_num_classes(num_classes)
        check_positive_ints(in_channels=in_channels, img_size=img_size, time_steps=time_steps, **architecture)
        self.num_classes, self.in_channels, self.img_size, self.time_steps = (num_classes, in_channels, img_size,
                                                                              time_steps)

    def _make_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` outputs (0: no head, ``forward`` returns features). The model's
        recorded options follow, so that a checkpoint saved afterwards rebuilds the new head."""
        check_num_classes(num_classes)
        self.head = self._make_head(num_classes)  # first: a model that cannot change its head is left as it was
        self.num_classes = num_classes
        if isinstance(getattr(self, "model_args", None), dict):
            self.model_args["num_classes"] = num_classes

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's name for it); an ``nn.Identity`` after ``reset_classifier(0)``."""
        return self.head

    def check_input(self, x: Tensor) -> None:
        """Clear errors for inputs that do not fit the model (rank, channels, size, time steps)."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (4, 5):
            raise InputError(f"expected images [B, C, H, W] or event frames [T, B, C, H, W], "
                             f"got a tensor of shape {tuple(x.shape)}")
        if x.dim() == 5 and x.shape[0] != self.time_steps:
            raise InputError(f"event input has T={x.shape[0]} frames but the model has time_steps="
                             f"{self.time_steps}; rebuild with time_steps={x.shape[0]} or re-bin the events")
        c, h, w = x.shape[-3:]
        if c != self.in_channels:
            raise InputError(f"input has {c} channels, the model expects in_channels={self.in_channels}")
        if (h, w) != (self.img_size, self.img_size):
            raise InputError(f"input is {h}x{w}, the model expects img_size={self.img_size} "
                             f"({self.img_size}x{self.img_size})")
        if not x.is_floating_point():
            raise InputError(f"input must be a floating-point tensor, got {x.dtype}")
        weight = next(self.parameters(), None)
        # autocast reconciles float32 / bfloat16 / float16, never float64
        mixed_ok = _autocast_on(x.device.type) and torch.float64 not in (x.dtype, getattr(weight, "dtype", None))
        if weight is not None and x.dtype != weight.dtype and not mixed_ok:
            raise InputError(f"input is {x.dtype} but the model's weights are {weight.dtype}; convert one "
                             f"(x.to({weight.dtype}) or model.to({x.dtype})) or run under torch.autocast")

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, S, D]``."""
        raise NotImplementedError

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Any:
        """Logits of the streams' mean (one head); ``pre_logits``: the mean itself, ``[B, D]``."""
        feats = feats.mean(dim=1)
        return feats if pre_logits else self.head(feats)

    def forward(self, x: Tensor) -> Any:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, in_channels={self.in_channels}, img_size={self.img_size}, "
                f"time_steps={self.time_steps}, num_features={self.num_features}")
