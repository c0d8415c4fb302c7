"""RandAugment's image operations in torch, batch-wise, on the device that holds the batch, with timm's semantics.

RandAugment (Cubuk et al., "RandAugment: practical automated data augmentation with a reduced search
space", CVPR-W 2020) draws its operations from a fixed list, all at one global magnitude ``M`` on a 0..10 scale;
the policy that draws them is :class:`~bestformer.data.transforms.randaugment.RandAugment`. What follows timm
(``timm.data.auto_augment``, read, not copied):

- the op lists: :data:`RAND_OPS` is timm's default ``rand`` list (no Cutout: timm does random erasing
  separately, as does :class:`~bestformer.data.transforms.batch.BatchAugment`); :data:`RAND_INCREASING_OPS` is
  its ``inc1`` list, where Posterize, Solarize, Color, Contrast, Brightness and Sharpness grow stronger
  with the magnitude (their plain forms get *weaker*: Posterize keeps ``int(0.4 M)`` bits, so M=0 is black);
- the op arguments: Rotate ``3 M`` degrees, ShearX/Y ``0.03 M``, TranslateX/YRel ``0.045 M`` of the image
  side, enhancement factors ``0.18 M + 0.1`` (increasing: ``max(0.1, 1 +- 0.09 M)``), Posterize
  ``int(0.4 M)`` bits (increasing: ``4 - int(0.4 M)``), Solarize threshold ``min(256, int(25.6 M))``
  (increasing: 256 minus it), SolarizeAdd ``min(128, int(11 M))`` added below level 128;
- the pixel maths of PIL, which timm calls: ``ImageOps.autocontrast / equalize / solarize / posterize``,
  ``ImageEnhance.Color / Contrast / Brightness / Sharpness`` (a blend with a grey image, the mean grey, black,
  or the 3x3 SMOOTH filter with the border kept), and ``Image.transform`` affine maps in pixel-centre
  coordinates (PIL's ``rotate`` about the image centre, shears about the top-left corner).

Ours, where timm is silent or differs:

- the images are float tensors in ``[0, 1]``, not 8-bit PIL images. Blends stay continuous (PIL truncates each
  result to 8 bits and rounds the grey image and Contrast's mean, so the two differ by up to about 1.5 levels);
  the level-based ops (Posterize, Solarize's and SolarizeAdd's thresholds, Equalize's histogram) use the nearest
  of the 256 levels;
- geometric ops sample with nearest neighbour (timm picks bilinear or bicubic at random) by exact integer
  indexing with PIL's convention (output pixel ``(x, y)`` reads input pixel ``floor(A (x + 0.5, y + 0.5, 1))``);
  pixels from outside are filled with ``fill``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import check_choice

#: Magnitudes are on a 0..10 scale (timm's ``_LEVEL_DENOM``).
LEVEL_DENOM = 10.0
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, PIL's RGB -> L conversion
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, divided by 13


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
