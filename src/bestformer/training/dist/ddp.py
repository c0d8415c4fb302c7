"""Models in a distributed run: DistributedDataParallel wrapping with optional synced BatchNorm, gradient
accumulation without extra all-reduces, and a frozen distillation teacher shared by all ranks."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...layers.norm import convert_distributed_batchnorm
from .collectives import broadcast_module
from .context import DDP_WRAPPERS, DistContext


def wrap_ddp(model: nn.Module, ctx: DistContext, sync_bn: bool = False,
             find_unused_parameters: bool = False) -> nn.Module:
    """Move ``model`` to the context's device and wrap it in DistributedDataParallel (unchanged in a
    single-process run). DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
    from the same weights.

    ``sync_bn``: BatchNorm statistics over the micro-batches of all ranks, as one global batch:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`DistributedBatchNorm` on CPU (the model's BatchNorm layers are
    replaced in place). Without it each rank normalizes with its own micro-batch's statistics, exactly as a
    single process accumulating the same micro-batches.
    """
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model
    if sync_bn:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_distributed_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    wrapper = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    DDP_WRAPPERS.add(wrapper)  # released before the group is left (destroy_distributed)
    return wrapper


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (for evaluation, checkpoints and ``model_name``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: skip DDP's gradient all-reduce unless ``sync`` (the step's
    last micro-batch), so accumulation costs one all-reduce per optimizer step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def prepare_teacher(teacher: nn.Module, ctx: DistContext) -> nn.Module:
    """A frozen distillation teacher for this rank: on its device, eval mode, no gradients, with rank 0's weights
    (broadcast, so that all ranks distil from the same teacher). It is not wrapped in DDP (nothing to train):
    each rank runs it on its own micro-batches only. Eq. 15's teacher label ``argmax teacher(x)`` is per sample
    in eval mode, so the sharded targets equal those of a single process on the whole batch."""
    teacher = unwrap_model(teacher).to(ctx.device).eval().requires_grad_(False)
    return broadcast_module(teacher) if ctx.is_distributed else teacher
