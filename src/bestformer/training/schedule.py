"""Learning-rate schedule: linear warm-up, cosine decay, then cool-down at the minimum (timm's
``CosineLRScheduler`` with ``warmup_t`` and ``cooldown_epochs``, as in the BESTformer reference recipe). timm's
default, and the reference's, runs the cosine over the whole run with the warm-up inside it (the rate steps down
slightly where the warm-up ends); ``warmup_prefix=True`` starts the cosine at the end of the warm-up instead.

The rate is a pure function of the optimizer step, updated every step (not every epoch), so the schedule
has no state of its own: resuming at step ``s`` gives exactly the rate an uninterrupted run had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer


@dataclass(frozen=True)
class CosineSchedule:
    """``lr(step)``: warm-up ``warmup_lr -> lr`` over ``warmup_epochs``, cosine ``lr -> min_lr`` until
    ``epochs``, then ``min_lr`` during the ``cooldown_epochs`` that follow.

    Epochs are fractional (``step / steps_per_epoch``), ``epochs`` too when a run is given as a step count
    (``max_steps``: the cosine then ends at that step). A warm-up as long as the whole schedule simply
    ramps up to ``lr`` at the end. ``warmup_prefix``: the cosine's phase is ``(e - warmup) / (epochs - warmup)``
    (timm's ``warmup_prefix=True``) instead of ``e / epochs`` (timm's default).
    """

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: float
    epochs: float
    cooldown_epochs: int
    steps_per_epoch: int
    warmup_prefix: bool = True

    @property
    def total_epochs(self) -> int:
        """Epochs the run lasts (the last one partial when ``epochs`` is fractional: a planned step count)."""
        return math.ceil(self.epochs + self.cooldown_epochs - 1e-9)

    def __call__(self, step: int) -> float:
        e = step / self.steps_per_epoch
        warm = min(self.warmup_epochs, self.epochs)
        if e < warm:
            return self.warmup_lr + (self.lr - self.warmup_lr) * e / warm
        if e >= self.epochs:
            return self.min_lr
        t = (e - warm) / (self.epochs - warm) if self.warmup_prefix else e / self.epochs
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set the rate of every parameter group for ``step``; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
