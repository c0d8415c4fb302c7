"""1-bit weights stored as bits (issue 17): a pretrained file holds, for every weight a binarizer quantizes to
one bit, its sign bits (8 per byte) and two float32 values per output channel, the mean and standard deviation of
the latent weight; every other tensor stays as it was trained.

BESTformer's binarizer (Eq. 5-6) takes the sign of the standardized latent weight, so any latent weight with the
same signs after standardization gives exactly the trained binary weights. Loading rebuilds, per output channel,
``mean + std * (B - mean(B)) / std(B)`` (``B`` = +-1): a latent weight with the trained weight's own mean and
standard deviation (Eq. 5's two statistics) whose standardization is ``B``'s, so its signs are ``B``'s.
Evaluation is therefore bit-identical to the trained model's, fine-tuning starts from latent weights of the trained
scale, and packing a loaded model again gives the same statistics. :func:`pack_state` checks the codes of every
tensor it packs: a channel whose rebuilt codes would differ (a rounding corner, when the mean dwarfs the spread)
is stored with ``mean = 0``, ``std = 1`` instead, which reproduces them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import FileFormatError
from ..quant.quantizers import SignBinarizer

BITS, MEAN, STD = ".__bits", ".__mean", ".__std"


def binary_weights(model: nn.Module) -> dict[str, SignBinarizer]:
    """``{state-dict key: binarizer}`` of every weight that Eq. 6's sign binarizer quantizes to 1 bit."""
    found = {}
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if isinstance(q, SignBinarizer) and isinstance(getattr(module, "weight", None), torch.Tensor):
            found[f"{name}.weight" if name else "weight"] = q
    return found


def _channel_view(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _rebuild(bits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    b = (bits.to(torch.float32) * 2 - 1).reshape(shape[0], -1)  # {0, 1} -> {-1, +1}
    b_hat = b - b.mean(dim=1, keepdim=True)
    spread = b_hat.std(dim=1, keepdim=True) if b.shape[1] > 1 else torch.ones_like(b_hat[:, :1])
    b_std = torch.where(spread > 0, b_hat / spread.clamp_min(1e-30), torch.zeros_like(b_hat))  # constant: +1 only
    return (mean.view(-1, 1) + std.view(-1, 1) * b_std).reshape(shape)


def pack_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The model's state with its 1-bit weights packed; returns ``(tensors, {key: shape of each packed weight})``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    packed: dict[str, list[int]] = {}
    for key, quantizer in binary_weights(model).items():
        w = state.pop(key).to(torch.float32)
        codes = quantizer.codes(w)[0]
        bits = (codes > 0).reshape(-1)
        flat = _channel_view(w)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1) if flat.shape[1] > 1 else torch.ones_like(mean)  # one weight: no spread to keep
        rebuilt = _rebuild(bits, mean, std, tuple(w.shape))
        wrong = (quantizer.codes(rebuilt)[0] != codes).reshape(w.shape[0], -1).any(dim=1)
        mean[wrong], std[wrong] = 0.0, 1.0  # B itself: its codes are always B's
        if bool((quantizer.codes(_rebuild(bits, mean, std, tuple(w.shape)))[0] != codes).any()):
            raise FileFormatError(f"{key}: the packed signs do not reproduce the trained binary weights")
        state[key + BITS] = torch.from_numpy(np.packbits(bits.numpy().astype(np.uint8), bitorder="little"))
        state[key + MEAN], state[key + STD] = mean, std
        packed[key] = list(w.shape)
    return state, packed


def unpack_state(tensors: dict[str, torch.Tensor], packed: Any, where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`: the full state dict, with every packed weight rebuilt as float32 latents.
    ``packed`` comes from a file: every key, shape and size is checked before anything is allocated."""
    if not isinstance(packed, dict):
        raise FileFormatError(f"{where}: the list of packed weights is not a mapping")
    state = dict(tensors)
    for key, shape in packed.items():
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape)):
            raise FileFormatError(f"{where}: packed weight {key!r} has an invalid shape {shape!r}")
        try:
            bits, mean, std = (state.pop(key + suffix) for suffix in (BITS, MEAN, STD))
        except KeyError:
            raise FileFormatError(f"{where}: packed weight {key!r} lacks its bits, mean or std") from None
        n = math.prod(shape)  # Python ints: no wrap-around
        if bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8 or mean.shape != (shape[0],) \
                or std.shape != (shape[0],) or mean.dtype != torch.float32 or std.dtype != torch.float32:
            raise FileFormatError(f"{where}: packed weight {key!r} does not match its shape {shape}")
        signs = np.unpackbits(bits.numpy(), count=n, bitorder="little")
        state[key] = _rebuild(torch.from_numpy(signs), mean, std, tuple(shape))
    return state
