"""RandAugment in torch, batch-wise, on the device that holds the batch, with timm's semantics.

RandAugment (Cubuk et al., "RandAugment: practical automated data augmentation with a reduced search
space", CVPR-W 2020) applies ``num_ops`` operations drawn uniformly (with replacement) from a fixed list,
all at one global magnitude ``M`` on a 0..10 scale. The BESTformer reference trains with timm's version
("RandAugment m9 n1" on CIFAR; the Spikformer CIFAR config it shares its other numbers with reads
``rand-m9-n1-mstd0.4-inc1``). The ops, their arguments and their pixel maths are in
:mod:`bestformer.data.transforms.ops`; the policy here follows timm (``timm.data.auto_augment``, read, not
copied): each op is applied with probability ``prob`` (timm: 0.5); its magnitude is drawn per application from
``N(M, mstd)`` (uniform on ``[0, M]`` when ``mstd`` is infinite; the spec writes that ``mstd101``) and clipped to
``[0, magnitude_max]`` (timm: 10); signed ops (Rotate, Shear, Translate, the increasing enhancements) get a
random sign.

Ours, where timm is silent or differs:

- every sample of a batch draws its own ops, probabilities, magnitudes and signs (timm works image by
  image on the CPU); the samples that share an op are transformed together in one call. The draws come from
  a ``numpy.random.Generator`` the caller passes in, in a fixed order that does not depend on the pixels:
  the same generator state gives the same batch, on any device;
- the images are un-normalized with the dataset's ``mean``/``std`` to ``[0, 1]`` (clipped), transformed and
  normalized again; a sample no op touched comes back bit-identical. Geometric ops fill with the dataset mean
  by default, as timm's ``create_transform`` does (its ``img_mean``); 0.5 (timm's grey 128) when no mean is given;
- in the spec string, ``inc0`` means off (timm switches the increasing list on for any ``inc<digits>``),
  and timm's weighted op choice (``w0``) is not offered;
- event frames ``[T, B, 2, H, W]`` are rejected: event counts are no intensities in ``[0, 1]``, so the
  photometric ops have no meaning there, and the DVS recipe of the reference does not use RandAugment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError, InputError, check_choice
from .ops import _OPS, LEVEL_DENOM, RAND_INCREASING_OPS, RAND_OPS

_SPEC_KEYS = {"m": "magnitude", "mmax": "magnitude_max", "p": "prob"}  # the plain float parts
_SPEC_FORM = ("expected parts m<magnitude>, n<ops per image>, mstd<std>, mmax<max>, inc<0|1>, p<prob> "
              "joined by '-' (an optional 'rand-' first), e.g. 'm9-n1-mstd0.5'")


@dataclass(frozen=True)
class RandAugmentDraw:
    """The random choices of one batch, ``[num_ops, B]`` each: the op index (-1: that layer skips the
    sample), the magnitude and the sign of signed ops."""

    op: np.ndarray
    magnitude: np.ndarray
    negate: np.ndarray


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment on a batch of normalized images ``[B, C, H, W]`` (see the module docstring for what
    follows timm and what is ours).

    Args:
        num_ops: ops per image (timm's ``n``, default 2), drawn with replacement.
        magnitude: the magnitude ``M`` on the 0..10 scale (timm's ``m``, default 10).
        magnitude_std: std of the per-application gaussian noise on ``M`` (``mstd``, default 0); ``inf``:
            uniform on ``[0, M]``.
        magnitude_max: upper clip of the noisy magnitude (``mmax``, default 10).
        prob: probability that a drawn op is applied (timm: 0.5).
        ops: the op names (default :data:`RAND_OPS`; :data:`RAND_INCREASING_OPS` is timm's ``inc1``).
        mean, std: the per-channel normalization of the input (``None``: the input is already in ``[0, 1]``).
        fill: per-channel value in ``[0, 1]`` shifted in by geometric ops (default: ``mean``, else 0.5).

    The defaults are those of timm's spec parser, so ``RandAugment()`` is timm's ``"rand"``.
    """

    num_ops: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    prob: float = 0.5
    ops: tuple[str, ...] = RAND_OPS
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fill: tuple[float, ...] | float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ConfigError(f"RandAugment num_ops must be an integer >= 0, got {self.num_ops!r}")
        if not (math.isfinite(self.magnitude) and self.magnitude >= 0):
            raise ConfigError(f"RandAugment magnitude must be a finite number >= 0, got {self.magnitude}")
        if not (self.magnitude_std >= 0):
            raise ConfigError(f"RandAugment magnitude_std must be >= 0 (inf: uniform), got {self.magnitude_std}")
        if not (math.isfinite(self.magnitude_max) and self.magnitude_max > 0):
            raise ConfigError(f"RandAugment magnitude_max must be a finite number > 0, got {self.magnitude_max}")
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"RandAugment prob must be a probability in [0, 1], got {self.prob}")
        if not self.ops:
            raise ConfigError("RandAugment needs at least one op; available: " + ", ".join(_OPS))
        object.__setattr__(self, "ops", tuple(check_choice("RandAugment op", o, _OPS) for o in self.ops))
        if (self.mean is None) != (self.std is None):
            raise ConfigError("RandAugment needs both mean and std (or neither, for inputs in [0, 1])")
        if self.mean is not None and self.std is not None:
            mean, std = tuple(map(float, self.mean)), tuple(map(float, self.std))
            if len(mean) != len(std) or not all(s > 0 for s in std):
                raise ConfigError(f"RandAugment mean {mean} and std {std} must have one value per channel, std > 0")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        fill = self.fill if self.fill is not None else (self.mean if self.mean is not None else 0.5)
        fill = tuple(map(float, fill)) if isinstance(fill, Sequence) else float(fill)
        if not all(0.0 <= v <= 1.0 for v in (fill if isinstance(fill, tuple) else (fill,))):
            raise ConfigError(f"RandAugment fill must be in [0, 1] (un-normalized pixel values), got {fill}")
        object.__setattr__(self, "fill", fill)

    @classmethod
    def from_spec(cls, spec: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  fill: Sequence[float] | float | None = None) -> RandAugment:
        """Parse timm's spec string, e.g. ``"m9-n1-mstd0.5"`` or ``"rand-m9-n1-mstd0.4-inc1"``; the parts not
        given keep timm's defaults (n2, m10, mstd0, mmax10, p0.5, the plain op list)."""
        return cls(**parse_spec(spec), mean=None if mean is None else tuple(mean),
                   std=None if std is None else tuple(std),
                   fill=tuple(fill) if isinstance(fill, Sequence) else fill)

    def draw(self, batch: int, rng: np.random.Generator) -> RandAugmentDraw:
        """The choices for a batch of ``batch`` samples, in a fixed order of draws from ``rng``."""
        op = np.empty((self.num_ops, batch), dtype=np.int64)
        mag = np.empty((self.num_ops, batch), dtype=np.float64)
        neg = np.empty((self.num_ops, batch), dtype=bool)
        for layer in range(self.num_ops):
            choice = rng.integers(len(self.ops), size=batch)
            applied = rng.random(batch) < self.prob
            if math.isinf(self.magnitude_std):
                m = rng.uniform(0.0, self.magnitude, batch)
            else:
                m = rng.normal(self.magnitude, self.magnitude_std, batch)
            neg[layer] = rng.random(batch) < 0.5
            op[layer] = np.where(applied, choice, -1)
            mag[layer] = np.clip(m, 0.0, self.magnitude_max)
        return RandAugmentDraw(op, mag, neg)

    def apply(self, x: Tensor, draw: RandAugmentDraw) -> Tensor:
        """Transform ``x`` ``[B, C, H, W]`` as ``draw`` says, grouping the samples that share an op."""
        self._check(x)
        b, c = x.shape[:2]
        work = x if x.dtype == torch.float64 else x.float()
        dev = x.device
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=work.dtype, device=dev).view(1, c, 1, 1)
            std = torch.tensor(self.std, dtype=work.dtype, device=dev).view(1, c, 1, 1)
            img = (work * std + mean).clamp(0.0, 1.0)
        else:
            img = work.clamp(0.0, 1.0)
        fill = torch.as_tensor(self.fill, dtype=work.dtype, device=dev).expand(c)
        touched = np.zeros(b, dtype=bool)
        for layer in range(draw.op.shape[0]):
            for k in np.unique(draw.op[layer]):
                if k < 0:
                    continue
                rows = np.flatnonzero(draw.op[layer] == k)
                fn, level = _OPS[self.ops[k]]
                arg = np.zeros(len(rows)) if level is None else level(draw.magnitude[layer, rows],
                                                                       draw.negate[layer, rows])
                idx = torch.from_numpy(rows).to(dev)
                new = fn(img.index_select(0, idx), torch.from_numpy(arg).to(dev), fill)
                img.index_copy_(0, idx, new)  # img is our own tensor, never x
                touched[rows] = True
        if self.mean is not None and self.std is not None:
            img = (img - mean) / std
        keep = torch.from_numpy(touched).to(dev).view(b, 1, 1, 1)
        return torch.where(keep, img, work).to(x.dtype)

    def __call__(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        """Augment the batch ``x`` ``[B, C, H, W]`` with choices drawn from ``rng``."""
        self._check(x)
        return self.apply(x, self.draw(x.shape[0], rng))

    def _check(self, x: Tensor) -> None:
        if x.dim() == 5:
            raise ConfigError("RandAugment works on static images [B, C, H, W], not on event frames "
                              f"{list(x.shape)} [T, B, C, H, W]; switch rand_augment off for event datasets")
        if x.dim() != 4 or not x.is_floating_point():
            raise InputError(f"RandAugment expects float images [B, C, H, W], got {x.dtype} {list(x.shape)}")
        c = x.shape[1]
        n = len(self.mean) if self.mean is not None else (len(self.fill) if isinstance(self.fill, tuple) else c)
        if c != n:
            raise InputError(f"RandAugment was set up for {n} channels (its mean/std/fill) but the images have {c}")


def parse_spec(spec: str) -> dict[str, Any]:
    """The constructor arguments of :class:`RandAugment` in timm's spec string (see
    :meth:`RandAugment.from_spec`); a bad part raises a one-line :class:`ConfigError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty RandAugment spec {spec!r}; {_SPEC_FORM}")
    parts = spec.strip().split("-")
    if parts[0] == "rand":
        parts = parts[1:]
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for part in parts:
        hit = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d+)?)", part)
        if hit is None:
            raise ConfigError(f"RandAugment spec {spec!r}: cannot read part {part!r}; {_SPEC_FORM}")
        key, text = hit.groups()
        if key in seen:
            raise ConfigError(f"RandAugment spec {spec!r}: {key!r} is given twice")
        seen.add(key)
        val = float(text)
        if key in ("n", "inc") and not val.is_integer():
            raise ConfigError(f"RandAugment spec {spec!r}: part {part!r} needs an integer")
        if key == "inc" and val not in (0, 1):
            raise ConfigError(f"RandAugment spec {spec!r}: part {part!r} must be inc0 or inc1")
        if key == "n":
            out["num_ops"] = int(val)
        elif key == "inc":
            out["ops"] = RAND_INCREASING_OPS if val else RAND_OPS
        elif key == "mstd":
            out["magnitude_std"] = math.inf if val > 100 else val  # timm: a huge std means uniform magnitudes
        else:
            out[_SPEC_KEYS[key]] = val
    try:
        RandAugment(**out)
    except ConfigError as err:
        raise ConfigError(f"RandAugment spec {spec!r}: {err}") from None
    return out
