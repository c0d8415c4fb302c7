"""RandAugment: every op against PIL (the library timm's RandAugment calls), timm's magnitude -> argument
maps by hand, per-sample grouping, determinism, the spec parser and the normalized round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from bestformer.data.transforms import (
    RAND_INCREASING_OPS,
    RAND_OPS,
    BatchAugment,
    RandAugment,
    apply_op,
    list_ops,
    op_argument,
    parse_spec,
)
from bestformer.errors import ConfigError, InputError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FILL = (51 / 255, 102 / 255, 153 / 255)  # whole 8-bit levels, so that PIL's fill colour is exact
MAGNITUDES = (0.0, 2.5, 5.0, 9.0, 10.0)
EXACT = {"Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd",
         "TranslateXRel", "TranslateYRel"}
FIXED_POINT = {"Rotate", "ShearX", "ShearY"}  # PIL maps these with 16.16 fixed-point coordinates
# blends whose PIL degenerate image is rounded to 8 bits: the bound on that rounding, in levels
BLEND_ROUNDING = {"Color": 0.51, "Contrast": 1.0, "Sharpness": 0.5}


def _uint8_images(c: int) -> np.ndarray:
    """Five ``[H, W, C]`` 8-bit images, 20 x 27: noise, low contrast, a ramp, a dark one, and a flat one with
    509 dark pixels (Equalize's table then exceeds 255 at the top level, and PIL clips it)."""
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (5, 20, 27, c), dtype=np.uint8)
    imgs[1] = imgs[1] // 4 + 60
    imgs[2] = np.clip(np.arange(27)[None, :, None] * 9 + imgs[2] // 16, 0, 255)
    imgs[3] = imgs[3] // 3
    imgs[4] = 200
    imgs[4].reshape(-1, c)[:509] = rng.integers(0, 100, (509, c))
    return imgs


def _to_float(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0


def _pil_matrix(name: str, arg: float, w: int, h: int) -> tuple[float, ...]:
    """PIL's inverse affine map (output pixel centre -> input) of timm's geometric ops."""
    if name == "Rotate":  # Image.rotate: counter-clockwise about (w/2, h/2)
        t = -math.radians(arg)
        a, b = round(math.cos(t), 15), round(math.sin(t), 15)
        cx, cy = w / 2, h / 2
        return a, b, -a * cx - b * cy + cx, -b, a, b * cx - a * cy + cy
    return {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]


def _pil_op(img: Image.Image, name: str, arg: float | None) -> Image.Image:
    """What timm's op ``name`` does to a PIL image with the argument ``arg``, nearest-neighbour sampling."""
    fill = tuple(round(v * 255) for v in FILL)[: len(img.getbands())]
    base = name.removesuffix("Increasing")
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if base == "Posterize":  # PIL refuses 0 bits: timm's Posterize at M < 2.5 is a black image
        return ImageOps.posterize(img, int(arg)) if arg >= 1 else Image.new(img.mode, img.size, 0)
    if base == "Solarize":
        return ImageOps.solarize(img, int(arg))
    if name == "SolarizeAdd":
        lut = [min(255, i + int(arg)) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if base in enhance:
        return enhance[base](img).enhance(arg)
    if name == "Rotate":
        return img.rotate(arg, resample=Image.NEAREST, fillcolor=fill if len(fill) > 1 else fill[0])
    return img.transform(img.size, Image.AFFINE, _pil_matrix(name, arg, *img.size), resample=Image.NEAREST,
                         fillcolor=fill if len(fill) > 1 else fill[0])


def _near_pixel_edge(name: str, arg: float, h: int, w: int, tol: float = 1e-3) -> np.ndarray:
    """``[H, W]``: output pixels whose source coordinate lies within ``tol`` of a pixel edge, where PIL's
    16.16 fixed-point arithmetic may round to the other neighbour."""
    a, b, c, d, e, f = _pil_matrix(name, arg, w, h)
    x, y = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    sx, sy = a * x + b * y + c, d * x + e * y + f
    return (np.abs(sx - np.round(sx)) < tol) | (np.abs(sy - np.round(sy)) < tol)


# ------------------------------------------------------------------------------------- ops against PIL
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", list_ops())
def test_every_op_matches_pil(name: str, channels: int) -> None:
    imgs = _uint8_images(channels)
    x = _to_float(imgs)
    base = name.removesuffix("Increasing")
    for m in MAGNITUDES:
        for negate in (False, True):
            out = apply_op(x, name, m, negate, FILL[:channels]).permute(0, 2, 3, 1).double().numpy() * 255
            arg = op_argument(name, m, negate)
            a = None if arg is None else float(arg)
            for i, arr in enumerate(imgs):
                ref = np.asarray(_pil_op(Image.fromarray(arr.squeeze(-1) if channels == 1 else arr), name, a),
                                 dtype=np.float64).reshape(arr.shape)
                diff = out[i] - ref
                if name in EXACT:
                    assert np.abs(diff).max() < 1e-3, (name, m, negate, i)
                elif name in FIXED_POINT:  # rare misses, all where PIL's fixed point may round the other way
                    miss = np.abs(diff).max(axis=-1) > 1e-3
                    assert miss.mean() < 0.01 and not (miss & ~_near_pixel_edge(name, a, *arr.shape[:2])).any()
                elif name == "AutoContrast" or base == "Brightness":
                    assert diff.min() > -1e-3 and diff.max() < 1 + 1e-3, (name, m, i)  # PIL truncates
                else:
                    slack = BLEND_ROUNDING[base] * abs(1 - a) + 1e-3
                    assert diff.min() > -slack and diff.max() < 1 + slack, (name, m, negate, i)


def test_color_of_a_grey_image_is_the_identity() -> None:
    x = _to_float(_uint8_images(1))
    for m in MAGNITUDES:
        assert torch.equal(apply_op(x, "Color", m), x) and torch.equal(apply_op(x, "ColorIncreasing", m, True), x)


def test_op_arguments_follow_timm_by_hand() -> None:
    def arg(name: str, m: float, neg: bool = False) -> float:
        return float(op_argument(name, m, neg))

    assert arg("Rotate", 9) == pytest.approx(27.0) and arg("Rotate", 9, True) == pytest.approx(-27.0)
    assert arg("ShearX", 10, True) == pytest.approx(-0.3) and arg("TranslateYRel", 9) == pytest.approx(0.405)
    assert arg("Color", 9) == pytest.approx(1.72) and arg("Sharpness", 0) == pytest.approx(0.1)
    assert arg("ContrastIncreasing", 9) == pytest.approx(1.81) and arg("ContrastIncreasing", 9, True) == (
        pytest.approx(0.19))
    assert arg("BrightnessIncreasing", 10, True) == pytest.approx(0.1)  # kept >= 0.1
    assert (arg("Posterize", 9), arg("Posterize", 10), arg("PosterizeIncreasing", 9)) == (3, 4, 1)
    assert (arg("Solarize", 9), arg("Solarize", 10), arg("SolarizeIncreasing", 9)) == (230, 256, 26)
    assert (arg("SolarizeAdd", 9), arg("SolarizeAdd", 10)) == (99, 110)
    assert op_argument("Equalize", 9) is None and arg("Posterize", 9, True) == 3  # unsigned ops ignore the sign
    with pytest.raises(ConfigError, match="did you mean 'Rotate'"):
        op_argument("Rotat", 9)


def test_magnitude_zero_is_the_identity_where_timms_is() -> None:
    x = _to_float(_uint8_images(3))
    identity = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeIncreasing",
                "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing")
    for name in identity:
        for negate in (False, True):
            assert torch.allclose(apply_op(x, name, 0.0, negate, FILL), x, atol=1e-6), name
    # timm's plain forms weaken with the magnitude: at M=0 they are at their strongest
    assert torch.equal(apply_op(x, "Posterize", 0.0), torch.zeros_like(x))  # 0 bits kept
    assert torch.allclose(apply_op(x, "Solarize", 0.0), 1 - x)  # threshold 0: every pixel inverted
    assert torch.allclose(apply_op(x, "Brightness", 0.0), 0.1 * x)
    assert not torch.allclose(apply_op(x, "PosterizeIncreasing", 0.0), x, atol=1e-3)  # 4 bits kept
    for name in ("Color", "Contrast", "Sharpness"):
        assert (apply_op(x, name, 0.0) - x).abs().max() > 0.1, name


# --------------------------------------------------------------------------------- batch, determinism
def _normalize(img: torch.Tensor) -> torch.Tensor:
    return (img - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_grouped_batch_equals_sample_by_sample() -> None:
    ra = RandAugment(num_ops=2, magnitude=7, magnitude_std=1.0, prob=0.8, ops=RAND_INCREASING_OPS, mean=MEAN,
                     std=STD)
    x = _normalize(torch.rand(48, 3, 12, 16))
    draw = ra.draw(48, np.random.default_rng(3))
    assert set(draw.op[draw.op >= 0].tolist()) == set(range(len(RAND_INCREASING_OPS)))  # every op exercised
    out = ra.apply(x, draw)
    for i in range(48):
        img = (x[i:i + 1] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
        for layer in range(2):
            k = draw.op[layer, i]
            if k >= 0:
                img = apply_op(img, ra.ops[k], draw.magnitude[layer, i], draw.negate[layer, i], MEAN)
        if (draw.op[:, i] < 0).all():
            assert torch.equal(out[i], x[i])  # untouched samples come back bit-identical
        else:
            assert torch.allclose(out[i], _normalize(img[0]), atol=1e-5), (i, draw.op[:, i])


def test_draws_follow_the_distribution_and_the_generator() -> None:
    ra = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.5, prob=0.5)
    d = ra.draw(20000, np.random.default_rng(0))
    applied = d.op[0] >= 0
    assert abs(applied.mean() - 0.5) < 0.02 and abs(d.negate.mean() - 0.5) < 0.02
    counts = np.bincount(d.op[0][applied], minlength=len(RAND_OPS))
    assert counts.min() > 0.8 * applied.sum() / len(RAND_OPS)  # uniform op choice
    assert d.magnitude.max() <= 10.0 and abs(d.magnitude.mean() - 9.0) < 0.02
    assert abs(d.magnitude[d.magnitude < 10].std() - 0.5) < 0.1  # gaussian noise, clipped at 10
    uniform = RandAugment(magnitude=9, magnitude_std=math.inf).draw(20000, np.random.default_rng(0))
    assert uniform.magnitude.min() >= 0 and abs(uniform.magnitude.mean() - 4.5) < 0.1
    same = ra.draw(20000, np.random.default_rng(0))
    assert all(np.array_equal(getattr(d, k), getattr(same, k)) for k in ("op", "magnitude", "negate"))


def test_same_generator_same_batch() -> None:
    ra = RandAugment.from_spec("m9-n2-mstd0.5", mean=MEAN, std=STD)
    x = _normalize(torch.rand(16, 3, 10, 10))
    a = ra(x, np.random.default_rng(11))
    assert torch.equal(a, ra(x, np.random.default_rng(11)))
    assert not torch.equal(a, ra(x, np.random.default_rng(12)))


def test_batch_augment_runs_rand_augment_first_on_the_step_generator() -> None:
    ra = RandAugment.from_spec("m9-n1-mstd0.4-inc1", mean=MEAN, std=STD)
    x = _normalize(torch.rand(8, 3, 8, 8))
    y = torch.arange(8) % 4
    aug = BatchAugment(num_classes=4, seed=5, rand_augment=ra)
    out, target = aug(x, y, step=9, slot=1)
    assert torch.equal(out, ra(x, np.random.Generator(np.random.PCG64([5, 1, 9])))) and torch.equal(target, y)
    full = BatchAugment(num_classes=4, crop_padding=2, flip=0.5, random_erasing=0.3, seed=5, rand_augment=ra)
    assert torch.equal(full(x, y, step=3)[0], full(x, y, step=3)[0])
    assert not torch.equal(full(x, y, step=3)[0], full(x, y, step=4)[0])
    with pytest.raises(ConfigError, match="event frames"):
        aug(torch.rand(4, 8, 2, 8, 8), y, step=0)


def test_normalized_round_trip() -> None:
    x = _normalize(torch.rand(6, 3, 9, 9))
    unnorm = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    rng = np.random.default_rng(0)
    assert torch.equal(RandAugment(prob=0.0, mean=MEAN, std=STD)(x, rng), x)
    still = RandAugment(num_ops=1, magnitude=0, prob=1.0, ops=("Rotate",), mean=MEAN, std=STD)(x, rng)
    assert torch.allclose(still, x, atol=1e-5) and not torch.equal(still, x)  # a real round trip
    inverted = RandAugment(num_ops=1, prob=1.0, ops=("Invert",), mean=MEAN, std=STD)(x, rng)
    assert torch.allclose(inverted, _normalize(1 - unnorm), atol=1e-5)
    # a shift fills with the mean: 0 after normalization
    moved = RandAugment(num_ops=1, magnitude=10, prob=1.0, ops=("TranslateXRel",), mean=MEAN, std=STD)(x, rng)
    assert (moved == 0).all(dim=1).flatten(1).sum(1).min() >= 4 * 9


def test_grey_images_and_shape_errors() -> None:
    ra = RandAugment(num_ops=3, magnitude=9, prob=1.0, mean=(0.5,), std=(0.25,))
    x = torch.rand(10, 1, 8, 8) * 4 - 2
    out = ra(x, np.random.default_rng(1))
    assert out.shape == x.shape and not torch.equal(out, x)
    with pytest.raises(InputError, match="1 channels"):
        ra(torch.rand(2, 3, 8, 8), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        ra(torch.rand(3, 8, 8), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="event frames"):
        ra(torch.rand(4, 2, 1, 8, 8), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- spec parser
def test_spec_parser_reads_timm_strings() -> None:
    assert parse_spec("rand-m9-n1-mstd0.5") == {"magnitude": 9.0, "num_ops": 1, "magnitude_std": 0.5}
    assert parse_spec("m9-n1-mstd0.4-inc1")["ops"] == RAND_INCREASING_OPS
    assert parse_spec("m9-inc0")["ops"] == RAND_OPS
    assert parse_spec("mstd101-mmax20-p0.8") == {"magnitude_std": math.inf, "magnitude_max": 20.0, "prob": 0.8}
    ra = RandAugment.from_spec("rand", mean=MEAN, std=STD)  # timm's defaults: n2, m10, mstd0, p0.5
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob, ra.ops) == (2, 10.0, 0.0, 0.5, RAND_OPS)
    assert ra.fill == MEAN and RandAugment().fill == 0.5


@pytest.mark.parametrize("spec, part", [("m9-x3", "'x3'"), ("m9-n1.5", "'n1.5'"), ("inc2", "'inc2'"),
                                        ("m9-w0", "'w0'"), ("m-n1", "'m'"), ("m9-m3", "'m' is given twice"),
                                        ("p2", "prob"), ("", "empty")])
def test_spec_parser_names_the_bad_part(spec: str, part: str) -> None:
    with pytest.raises(ConfigError, match=part) as err:
        parse_spec(spec)
    assert "\n" not in str(err.value)


def test_constructor_checks() -> None:
    with pytest.raises(ConfigError, match="did you mean 'Equalize'"):
        RandAugment(ops=("Equalise",))
    with pytest.raises(ConfigError, match="both mean and std"):
        RandAugment(mean=MEAN)
    with pytest.raises(ConfigError, match="num_ops"):
        RandAugment(num_ops=-1)
    with pytest.raises(ConfigError, match="fill"):
        RandAugment(fill=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    ra = RandAugment.from_spec("m9-n2-mstd0.5-inc1", mean=MEAN, std=STD)
    x = _normalize(torch.rand(64, 3, 32, 32))
    draw = ra.draw(64, np.random.default_rng(0))
    assert torch.allclose(ra.apply(x.cuda(), draw).cpu(), ra.apply(x, draw), atol=1e-4)
