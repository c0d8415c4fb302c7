"""The parts a :class:`~.engine.Trainer` is composed of, each built from the run's config: the (DDP-wrapped)
model, AdamW, the batch sampler and loader, the learning-rate and time-step schedules, and the augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import batched, collate
from ..data.transforms import BatchAugment, RandAugment
from ..errors import ConfigError
from .budget import TimeStepSchedule, parse_time_step_schedule
from .config import TrainConfig
from .dist import DistContext, ShardedBatchSampler, wrap_ddp
from .schedule import CosineSchedule


def channels_last_convolutions(model: nn.Module) -> None:
    """Store every 2-D convolution weight channels-last: the convolution outputs, and the BatchNorm, LIF and pooling
    layers after them, then keep that layout, which oneDNN convolves ~1.2-2x faster on CPU than NCHW (same maths;
    the summation order, hence the rounding, differs)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def prepare_model(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> nn.Module:
    """``model`` on the run's device (channels-last on CPU and gradient checkpointing when asked), wrapped in DDP
    with several processes."""
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cpu":
        channels_last_convolutions(model)
    if cfg.grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise ConfigError(f"--grad-checkpointing: {type(model).__name__} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    return wrap_ddp(model, ctx, sync_bn=cfg.sync_bn)


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW at ``lr`` (the schedule sets the rate of every step); no weight decay on BatchNorm, biases and the
    attention's lambda (timm's convention: parameters of one dimension or fewer)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def build_sampler(train_set: Dataset, cfg: TrainConfig, ctx: DistContext) -> ShardedBatchSampler:
    """This rank's shuffled micro-batches (``batch_size`` each, ``accum_steps`` per optimizer step)."""
    return ShardedBatchSampler(train_set, cfg.batch_size, cfg.accum_steps, ctx.world_size, ctx.rank, shuffle=True,
                               seed=cfg.seed)


def build_loader(train_set: Dataset, sampler: ShardedBatchSampler, cfg: TrainConfig, device: torch.device
                 ) -> DataLoader:
    # a private generator: creating the loader's iterator must not draw from the global torch RNG
    return DataLoader(batched(train_set), batch_sampler=sampler, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda", collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed))


def build_schedule(cfg: TrainConfig, global_batch: int, steps_per_epoch: int, max_steps: int | None
                   ) -> tuple[CosineSchedule, int]:
    """The learning-rate schedule and the run's step count: ``epochs + cooldown_epochs`` epochs, or (``max_steps``)
    a cosine ending after that many steps; ``lr`` and ``warmup_lr`` scaled by ``lr_scaling`` at ``global_batch``."""
    spe = steps_per_epoch
    epochs, cooldown = (cfg.epochs, cfg.cooldown_epochs) if max_steps is None else (max_steps / spe, 0)
    k = cfg.lr_factor(global_batch)
    schedule = CosineSchedule(cfg.lr * k, cfg.min_lr, cfg.warmup_lr * k, cfg.warmup_epochs, epochs, cooldown, spe,
                              cfg.warmup_prefix)
    return schedule, (cfg.epochs + cfg.cooldown_epochs) * spe if max_steps is None else max_steps


def build_time_step_schedule(cfg: TrainConfig, module: nn.Module) -> TimeStepSchedule | None:
    """The ``time_step_schedule`` of static images (``None`` without one), ending at the model's built ``T``."""
    if cfg.time_step_schedule is None:
        return None
    if not hasattr(module, "set_time_steps"):
        raise ConfigError(f"time_step_schedule: {module.model_name} cannot change its time steps")
    return parse_time_step_schedule(cfg.time_step_schedule, module.built_time_steps)


def build_augmentation(cfg: TrainConfig, num_classes: int, mean: Sequence[float] | None,
                       std: Sequence[float] | None) -> BatchAugment:
    """The batch augmentation (crop, flip, erasing, mixup / cutmix, RandAugment on un-normalized pixels)."""
    if cfg.rand_augment and (mean is None or std is None):
        raise ConfigError("rand_augment needs the normalization (mean, std) of the training images")
    rand_augment = RandAugment.from_spec(cfg.rand_augment, mean=mean, std=std) if cfg.rand_augment else None
    return BatchAugment(num_classes, cfg.crop_padding, cfg.flip, cfg.random_erasing, cfg.mixup, cfg.cutmix,
                        cfg.mixup_prob, cfg.mixup_switch_prob, cfg.seed, rand_augment)
