"""Batch augmentation in torch, on the device that holds the batch: RandAugment, random crop, horizontal flip,
random erasing, mixup and cutmix, in this order. timm runs RandAugment after its crop and flip; we run it
first, on the images as the dataset gives them, so that the zero padding of the crop does not enter the image
statistics of AutoContrast, Equalize and Contrast (the flip commutes with the ops in distribution: their signs
are random).

Images are ``[B, C, H, W]``; event frames ``[T, B, C, H, W]`` get one crop / flip / erased box per sample,
shared by all its frames. The random numbers of a micro-batch come from a generator seeded with ``(seed, slot,
step)``, not from the global RNG; ``slot`` is the micro-batch's place in its optimizer step over all processes
and accumulation steps (:class:`~bestformer.training.dist.MicroBatch`), so every micro-batch of a step draws
anew, and a resumed run (on another device or number of processes) augments every step exactly as an
uninterrupted run did.

Sources: mixup (Zhang et al., ICLR 2018) and cutmix (Yun et al., ICCV 2019) as in timm's batch mode (one
``lambda ~ Beta(alpha, alpha)`` per batch, the batch mixed with its reverse, cutmix's ``lambda`` corrected
to the box actually cut); random erasing (Zhong et al., AAAI 2020) with per-pixel normal noise (timm's
``remode='pixel'``), one box per sample clipped to the image (timm retries up to 10 times instead);
RandAugment as in :mod:`bestformer.data.transforms.randaugment` (static images only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .randaugment import RandAugment


def _as_images(x: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """``[T, B, C, H, W] -> [B, T * C, H, W]`` so that every frame of a sample is transformed alike."""
    if x.dim() == 4:
        return x, None
    t, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, t * c, h, w), (t, b, c, h, w)


def _from_images(x: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    if shape is None:
        return x
    t, b, c, h, w = shape
    return x.reshape(b, t, c, h, w).permute(1, 0, 2, 3, 4).contiguous()


def random_crop(x: Tensor, padding: int, offsets: Tensor) -> Tensor:
    """Zero-pad ``[B, C, H, W]`` by ``padding`` and cut ``H x W`` at ``offsets`` (``[B, 2]``, in
    ``[0, 2 * padding]``)."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [B, W]
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # advanced indexing put the channel axis last


def box_mask(h: int, w: int, top: Tensor, left: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
    """Boolean ``[B, 1, H, W]`` masks of the boxes ``[top, top + bh) x [left, left + bw)``."""
    dev = top.device
    r = torch.arange(h, device=dev)[None, :, None]
    c = torch.arange(w, device=dev)[None, None, :]
    m = ((r >= top[:, None, None]) & (r < (top + bh)[:, None, None])
         & (c >= left[:, None, None]) & (c < (left + bw)[:, None, None]))
    return m[:, None]


@dataclass(frozen=True)
class BatchAugment:
    """The training-time transform of a batch: ``(x, y) -> (x', target)``.

    ``target`` is ``y`` (class indices) when no mixing happened, else soft targets ``[B, num_classes]``.
    Label smoothing is applied by the loss, not here. ``rand_augment`` (normalized ``[B, C, H, W]`` images
    only: it raises :class:`~bestformer.errors.ConfigError` on event frames) runs first, on the step's generator,
    so that its draws, like all the others, are a function of ``(seed, slot, step)``.
    """

    num_classes: int
    crop_padding: int = 0
    flip: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    seed: int = 0
    rand_augment: RandAugment | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.rand_augment is not None or self.crop_padding or self.flip or self.random_erasing
                    or self.mixup or self.cutmix)

    def __call__(self, x: Tensor, y: Tensor, step: int, mix: bool = True, slot: int = 0) -> tuple[Tensor, Tensor]:
        if not self.enabled:
            return x, y
        rng = np.random.Generator(np.random.PCG64([self.seed, slot, step]))
        if self.rand_augment is not None:
            x = self.rand_augment(x, rng)
        imgs, shape = _as_images(x)
        b, dev = imgs.shape[0], imgs.device
        if self.crop_padding:
            offsets = torch.from_numpy(rng.integers(0, 2 * self.crop_padding + 1, size=(b, 2))).to(dev)
            imgs = random_crop(imgs, self.crop_padding, offsets)
        if self.flip:
            flip = torch.from_numpy(rng.random(b) < self.flip).to(dev)[:, None, None, None]
            imgs = torch.where(flip, imgs.flip(-1), imgs)
        if self.random_erasing:
            imgs = self._erase(imgs, rng, 1 if shape is None else shape[0])
        target: Tensor = y
        if mix and (self.mixup or self.cutmix) and rng.random() < self.mixup_prob:
            imgs, target = self._mix(imgs, y, rng)
        return _from_images(imgs, shape), target

    def _erase(self, imgs: Tensor, rng: np.random.Generator, frames: int) -> Tensor:
        b, tc, h, w = imgs.shape
        area = rng.uniform(0.02, 1 / 3, b) * h * w
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3), b))
        bh = np.clip(np.round(np.sqrt(area * aspect)), 1, h).astype(np.int64)
        bw = np.clip(np.round(np.sqrt(area / aspect)), 1, w).astype(np.int64)
        top = (rng.random(b) * (h - bh + 1)).astype(np.int64)
        left = (rng.random(b) * (w - bw + 1)).astype(np.int64)
        apply = rng.random(b) < self.random_erasing
        dev = imgs.device
        mask = box_mask(h, w, *(torch.from_numpy(a).to(dev) for a in (top, left, bh, bw)))
        mask &= torch.from_numpy(apply).to(dev)[:, None, None, None]
        # drawn on the CPU in float32 (a CUDA generator's stream is another): the same noise on every device
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn((b, tc // frames, h, w), generator=gen).to(dev, imgs.dtype)
        return torch.where(mask, noise.repeat(1, frames, 1, 1), imgs)  # the same noise in every frame

    def _mix(self, imgs: Tensor, y: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        h, w = imgs.shape[-2:]
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.mixup_switch_prob)
        lam = float(rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup))
        other = imgs.flip(0)
        if use_cutmix:
            ratio = np.sqrt(1.0 - lam)
            bh, bw = int(h * ratio), int(w * ratio)
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = np.clip(cy - bh // 2, 0, h), np.clip(cy + bh // 2, 0, h)
            x0, x1 = np.clip(cx - bw // 2, 0, w), np.clip(cx + bw // 2, 0, w)
            imgs = imgs.clone()
            imgs[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            imgs = imgs * lam + other * (1.0 - lam)
        one_hot = torch.nn.functional.one_hot(y, self.num_classes).to(imgs.dtype)
        return imgs, one_hot * lam + one_hot.flip(0) * (1.0 - lam)
