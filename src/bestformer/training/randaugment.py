"""RandAugment in torch, batch-wise, on the device that holds the batch, with timm's semantics.

RandAugment (Cubuk et al., "RandAugment: practical automated data augmentation with a reduced search
space", CVPR-W 2020) applies ``num_ops`` operations drawn uniformly (with replacement) from a fixed list,
all at one global magnitude ``M`` on a 0..10 scale. The BESTformer reference trains with timm's version
("RandAugment m9 n1" on CIFAR; the Spikformer CIFAR config it shares its other numbers with reads
``rand-m9-n1-mstd0.4-inc1``). What follows timm (``timm.data.auto_augment``, read, not copied):

- the op lists: :data:`RAND_OPS` is timm's default ``rand`` list (no Cutout: timm does random erasing
  separately, as does :class:`~bestformer.training.augment.BatchAugment`); :data:`RAND_INCREASING_OPS` is
  its ``inc1`` list, where Posterize, Solarize, Color, Contrast, Brightness and Sharpness grow stronger
  with the magnitude (their plain forms get *weaker*: Posterize keeps ``int(0.4 M)`` bits, so M=0 is black);
- each op is applied with probability ``prob`` (timm: 0.5); its magnitude is drawn per application from
  ``N(M, mstd)`` (uniform on ``[0, M]`` when ``mstd`` is infinite; the spec writes that ``mstd101``) and clipped to
  ``[0, magnitude_max]`` (timm: 10); signed ops (Rotate, Shear, Translate, the increasing enhancements)
  get a random sign;
- the op arguments: Rotate ``3 M`` degrees, ShearX/Y ``0.03 M``, TranslateX/YRel ``0.045 M`` of the image
  side, enhancement factors ``0.18 M + 0.1`` (increasing: ``max(0.1, 1 +- 0.09 M)``), Posterize
  ``int(0.4 M)`` bits (increasing: ``4 - int(0.4 M)``), Solarize threshold ``min(256, int(25.6 M))``
  (increasing: 256 minus it), SolarizeAdd ``min(128, int(11 M))`` added below level 128;
- the pixel maths of PIL, which timm calls: ``ImageOps.autocontrast / equalize / solarize / posterize``,
  ``ImageEnhance.Color / Contrast / Brightness / Sharpness`` (a blend with a grey image, the mean grey, black,
  or the 3x3 SMOOTH filter with the border kept), and ``Image.transform`` affine maps in pixel-centre
  coordinates (PIL's ``rotate`` about the image centre, shears about the top-left corner).

Ours, where timm is silent or differs:

- every sample of a batch draws its own ops, probabilities, magnitudes and signs (timm works image by
  image on the CPU); the samples that share an op are transformed together in one call. The draws come from
  a ``numpy.random.Generator`` the caller passes in, in a fixed order that does not depend on the pixels:
  the same generator state gives the same batch, on any device;
- the images are float tensors, not 8-bit PIL images: they are un-normalized with the dataset's
  ``mean``/``std`` to ``[0, 1]`` (clipped), transformed and normalized again; a sample no op touched comes
  back bit-identical. Blends stay continuous (PIL truncates each result to 8 bits and rounds the grey image
  and Contrast's mean, so the two differ by up to about 1.5 levels); the level-based ops (Posterize,
  Solarize's and SolarizeAdd's thresholds, Equalize's histogram) use the nearest of the 256 levels;
- geometric ops sample with nearest neighbour (timm picks bilinear or bicubic at random) by exact integer
  indexing with PIL's convention (output pixel ``(x, y)`` reads input pixel ``floor(A (x + 0.5, y + 0.5, 1))``);
  pixels from outside are filled with ``fill``, by default the dataset mean, as timm's ``create_transform``
  does (its ``img_mean``); 0.5 (timm's grey 128) when no mean is given;
- in the spec string, ``inc0`` means off (timm switches the increasing list on for any ``inc<digits>``),
  and timm's weighted op choice (``w0``) is not offered;
- event frames ``[T, B, 2, H, W]`` are rejected: event counts are no intensities in ``[0, 1]``, so the
  photometric ops have no meaning there, and the DVS recipe of the reference does not use RandAugment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputError, check_choice

#: Magnitudes are on a 0..10 scale (timm's ``_LEVEL_DENOM``).
LEVEL_DENOM = 10.0
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, PIL's RGB -> L conversion
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, divided by 13
_SPEC_KEYS = {"m": "magnitude", "mmax": "magnitude_max", "p": "prob"}  # the plain float parts
_SPEC_FORM = ("expected parts m<magnitude>, n<ops per image>, mstd<std>, mmax<max>, inc<0|1>, p<prob> "
              "joined by '-' (an optional 'rand-' first), e.g. 'm9-n1-mstd0.5'")


# ----------------------------------------------------------------------------------- pixel operations
def _levels(x: Tensor) -> Tensor:
    """The nearest of the 256 8-bit levels of ``x`` in ``[0, 1]``, as int64."""
    return (x * 255.0).round().clamp(0, 255).long()


def _col(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample values ``[b]`` as ``[b, 1, 1, 1]`` in ``like``'s dtype."""
    return v.to(like.dtype).view(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: ``degenerate + factor (x - degenerate)``, clipped."""
    return (degenerate + _col(factor, x) * (x - degenerate)).clamp(0.0, 1.0)


def _grey(x: Tensor) -> Tensor:
    """``[b, 1, H, W]`` luma of RGB images (the image itself when grey)."""
    if x.shape[1] != 3:
        return x
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _auto_contrast(x: Tensor, _arg: Tensor, _fill: Tensor) -> Tensor:
    """``ImageOps.autocontrast``: stretch each channel to ``[0, 1]``; a flat channel is left alone."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def _equalize(x: Tensor, _arg: Tensor, _fill: Tensor) -> Tensor:
    """``ImageOps.equalize`` per channel: the level map from the cumulative 256-bin histogram,
    ``lut[i] = (step // 2 + #pixels below i) // step`` with ``step = (N - #pixels at the top level) // 255``;
    identity when ``step`` is 0 (a flat or almost flat channel)."""
    b, c, h, w = x.shape
    lv = _levels(x).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, lv, torch.ones_like(lv))
    top = hist.gather(1, lv.amax(dim=1, keepdim=True))
    step = (h * w - top) // 255
    lut = (step // 2 + hist.cumsum(1) - hist) // step.clamp_min(1)
    out = lut.clamp_max(255).gather(1, lv).view(b, c, h, w).to(x.dtype) / 255.0
    return torch.where(step.view(b, c, 1, 1) > 0, out, x)


def _invert(x: Tensor, _arg: Tensor, _fill: Tensor) -> Tensor:
    return 1.0 - x


def _posterize(x: Tensor, bits: Tensor, _fill: Tensor) -> Tensor:
    """``ImageOps.posterize``: keep the ``bits`` most significant bits of each level (8 bits: unchanged)."""
    bits = bits.long().clamp(0, 8)
    mask = (255 << (8 - bits)) & 255
    out = (_levels(x) & mask.view(-1, 1, 1, 1)).to(x.dtype) / 255.0
    return torch.where(bits.view(-1, 1, 1, 1) >= 8, x, out)


def _solarize(x: Tensor, threshold: Tensor, _fill: Tensor) -> Tensor:
    """``ImageOps.solarize``: invert the pixels whose level is ``>= threshold`` (256: none)."""
    return torch.where(x * 255.0 >= _col(threshold, x) - 0.5, 1.0 - x, x)


def _solarize_add(x: Tensor, add: Tensor, _fill: Tensor) -> Tensor:
    """timm's ``solarize_add``: add ``add`` levels to the pixels below level 128, clipped at white."""
    return torch.where(x * 255.0 < 127.5, (x + _col(add, x) / 255.0).clamp_max(1.0), x)


def _color(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    """``ImageEnhance.Color``: blend with the grey image (identity on grey images)."""
    return x if x.shape[1] != 3 else _blend(_grey(x), x, factor)


def _contrast(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    """``ImageEnhance.Contrast``: blend with the mean grey value of the image."""
    return _blend(_grey(x).mean(dim=(1, 2, 3), keepdim=True), x, factor)


def _brightness(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def _sharpness(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image, whose one-pixel border is the
    image's own (PIL does not filter the border)."""
    b, c, h, w = x.shape
    smooth = x.clone()
    if h > 2 and w > 2:
        k = torch.tensor(_SMOOTH, dtype=x.dtype, device=x.device).view(1, 1, 3, 3) / 13.0
        smooth[..., 1:-1, 1:-1] = F.conv2d(x.reshape(b * c, 1, h, w), k).view(b, c, h - 2, w - 2)
    return _blend(smooth, x, factor)


def _affine_nearest(x: Tensor, coeffs: Tensor, fill: Tensor) -> Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST)`` per sample: output pixel ``(x, y)``
    reads input ``(floor(a x' + b y' + c), floor(d x' + e y' + f))`` at the pixel centre ``(x', y') =
    (x + 0.5, y + 0.5)``; pixels from outside the image get ``fill``. ``coeffs`` is ``[b, 6]`` float64 (the
    coordinates are float64 so that a coordinate just below an integer is not rounded up)."""
    b, c, h, w = x.shape
    xs = torch.arange(w, dtype=torch.float64, device=x.device) + 0.5
    ys = torch.arange(h, dtype=torch.float64, device=x.device)[:, None] + 0.5
    a, sh, tx, d, e, ty = (coeffs[:, i, None, None] for i in range(6))
    sx = torch.floor(a * xs + sh * ys + tx)  # [b, H, W]
    sy = torch.floor(d * xs + e * ys + ty)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).long().view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, src).view(b, c, h, w)
    return torch.where(inside[:, None], out, fill.view(1, c, 1, 1))


def _coeffs(*cols: Tensor | float, like: Tensor) -> Tensor:
    n = like.shape[0]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=like.device).expand(n) for v in cols], 1)


def _rotate(x: Tensor, degrees: Tensor, fill: Tensor) -> Tensor:
    """``Image.rotate(degrees)``: counter-clockwise about the image centre ``(W/2, H/2)``, same size."""
    h, w = x.shape[-2:]
    t = -torch.deg2rad(degrees)
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    tx = -cos * cx - sin * cy + cx
    ty = sin * cx - cos * cy + cy
    return _affine_nearest(x, _coeffs(cos, sin, tx, -sin, cos, ty, like=degrees), fill)


def _shear_x(x: Tensor, s: Tensor, fill: Tensor) -> Tensor:
    return _affine_nearest(x, _coeffs(1.0, s, 0.0, 0.0, 1.0, 0.0, like=s), fill)


def _shear_y(x: Tensor, s: Tensor, fill: Tensor) -> Tensor:
    return _affine_nearest(x, _coeffs(1.0, 0.0, 0.0, s, 1.0, 0.0, like=s), fill)


def _translate_x_rel(x: Tensor, frac: Tensor, fill: Tensor) -> Tensor:
    """Shift by ``frac`` of the width (positive: the content moves left, as in timm)."""
    return _affine_nearest(x, _coeffs(1.0, 0.0, frac * x.shape[-1], 0.0, 1.0, 0.0, like=frac), fill)


def _translate_y_rel(x: Tensor, frac: Tensor, fill: Tensor) -> Tensor:
    return _affine_nearest(x, _coeffs(1.0, 0.0, 0.0, 0.0, 1.0, frac * x.shape[-2], like=frac), fill)


# ------------------------------------------------------------------------ magnitude -> argument (timm)
def _sign(negate: np.ndarray) -> np.ndarray:
    return np.where(negate, -1.0, 1.0)


def _rotate_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return _sign(neg) * (m / LEVEL_DENOM) * 30.0


def _shear_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return _sign(neg) * (m / LEVEL_DENOM) * 0.3


def _translate_rel_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return _sign(neg) * (m / LEVEL_DENOM) * 0.45


def _enhance_arg(m: np.ndarray, _neg: np.ndarray) -> np.ndarray:
    return (m / LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return np.maximum(0.1, 1.0 + _sign(neg) * (m / LEVEL_DENOM) * 0.9)


def _posterize_arg(m: np.ndarray, _neg: np.ndarray) -> np.ndarray:
    return np.floor((m / LEVEL_DENOM) * 4)


def _posterize_increasing_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return 4 - _posterize_arg(m, neg)


def _solarize_arg(m: np.ndarray, _neg: np.ndarray) -> np.ndarray:
    return np.minimum(256.0, np.floor((m / LEVEL_DENOM) * 256))


def _solarize_increasing_arg(m: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return 256 - _solarize_arg(m, neg)


def _solarize_add_arg(m: np.ndarray, _neg: np.ndarray) -> np.ndarray:
    return np.minimum(128.0, np.floor((m / LEVEL_DENOM) * 110))


_Apply = Callable[[Tensor, Tensor, Tensor], Tensor]
_Level = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: name -> (pixel operation, magnitude -> argument or None for ops without one); timm's names.
_OPS: dict[str, tuple[_Apply, _Level | None]] = {
    "AutoContrast": (_auto_contrast, None),
    "Equalize": (_equalize, None),
    "Invert": (_invert, None),
    "Rotate": (_rotate, _rotate_arg),
    "Posterize": (_posterize, _posterize_arg),
    "PosterizeIncreasing": (_posterize, _posterize_increasing_arg),
    "Solarize": (_solarize, _solarize_arg),
    "SolarizeIncreasing": (_solarize, _solarize_increasing_arg),
    "SolarizeAdd": (_solarize_add, _solarize_add_arg),
    "Color": (_color, _enhance_arg),
    "ColorIncreasing": (_color, _enhance_increasing_arg),
    "Contrast": (_contrast, _enhance_arg),
    "ContrastIncreasing": (_contrast, _enhance_increasing_arg),
    "Brightness": (_brightness, _enhance_arg),
    "BrightnessIncreasing": (_brightness, _enhance_increasing_arg),
    "Sharpness": (_sharpness, _enhance_arg),
    "SharpnessIncreasing": (_sharpness, _enhance_increasing_arg),
    "ShearX": (_shear_x, _shear_arg),
    "ShearY": (_shear_y, _shear_arg),
    "TranslateXRel": (_translate_x_rel, _translate_rel_arg),
    "TranslateYRel": (_translate_y_rel, _translate_rel_arg),
}

#: timm's default RandAugment list (``rand-...``).
RAND_OPS: tuple[str, ...] = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                             "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                             "TranslateXRel", "TranslateYRel")
#: timm's ``inc1`` list: the same ops with severity increasing with the magnitude.
RAND_INCREASING_OPS: tuple[str, ...] = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                                        "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                                        "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                                        "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def list_ops() -> list[str]:
    """The names of every available op."""
    return list(_OPS)


def op_argument(name: str, magnitude: float | np.ndarray, negate: bool | np.ndarray = False) -> np.ndarray | None:
    """timm's argument of op ``name`` at ``magnitude`` (degrees, shear, fraction of the side, factor, bits,
    threshold or levels added; ``negate`` flips the sign of signed ops); ``None`` for ops without one."""
    level = _OPS[check_choice("RandAugment op", name, _OPS)][1]
    if level is None:
        return None
    m = np.asarray(magnitude, dtype=np.float64)
    return level(m, np.broadcast_to(np.asarray(negate, dtype=bool), m.shape))


def apply_op(x: Tensor, name: str, magnitude: float | np.ndarray = 0.0, negate: bool | np.ndarray = False,
             fill: float | Sequence[float] = 0.5) -> Tensor:
    """Apply op ``name`` to images ``x`` ``[B, C, H, W]`` in ``[0, 1]`` (not normalized), with one
    ``magnitude`` and ``negate`` for all samples or one per sample; ``fill`` (per channel, in ``[0, 1]``)
    is what geometric ops shift in from outside."""
    fn = _OPS[check_choice("RandAugment op", name, _OPS)][0]
    b, c = x.shape[:2]
    arg = op_argument(name, np.broadcast_to(np.asarray(magnitude, dtype=np.float64), (b,)),
                      np.broadcast_to(np.asarray(negate, dtype=bool), (b,)))
    arg_t = torch.zeros(b, dtype=torch.float64, device=x.device) if arg is None else torch.from_numpy(
        np.ascontiguousarray(arg)).to(x.device)
    return fn(x, arg_t, torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand(c))


# --------------------------------------------------------------------------------------- RandAugment
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
