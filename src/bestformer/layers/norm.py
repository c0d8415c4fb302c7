"""BatchNorm whose training statistics span every rank of a ``torch.distributed`` run (our CPU SyncBatchNorm).

Not from the papers (BESTformer trained on 4 GPUs with timm's script); it makes a W-process run with synced
BatchNorm equal a single-process run with W times the batch, also on CPU, where ``nn.SyncBatchNorm`` is missing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: ``y = sum_r x_r`` on every rank; the gradient of rank ``r``'s input is the
    sum over ranks of ``dL_r'/dy`` (the all-reduce is its own adjoint)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span the current micro-batch of every rank (our CPU SyncBatchNorm).

    Forward (train mode): each rank sums its inputs per channel in float64; one differentiable all-reduce gives
    the global sum and count, hence the mean; a second one the global sum of squared deviations, hence the biased
    variance (two passes in float64: no ``E[x^2] - E[x]^2`` cancellation, at the cost of a float64 copy of the
    input). The output is ``(x - mean) / sqrt(var + eps) * weight + bias`` and the running statistics are
    updated as by :class:`torch.nn.BatchNorm2d` (unbiased variance ``var n / (n - 1)``, ``momentum``, or the
    cumulative average when it is ``None``). Because the all-reduces are differentiable, the backward pass carries
    every rank's gradient through the shared statistics: forward *and* gradients equal those of one BatchNorm over
    the concatenated micro-batches (up to float rounding), which is what makes a W-process run equal a
    single-process run with W times the batch. Eval mode and a run without process group use the running
    statistics / the plain per-batch path of ``F.batch_norm``.

    Why not ``nn.SyncBatchNorm``: torch implements it for CUDA only (it is used there, see
    :func:`bestformer.training.dist.wrap_ddp`).
    Channels: dimension 1 of any input of 2 or more dimensions (BatchNorm1d ``[M, C]`` / ``[B, C, L]`` and
    BatchNorm2d ``[B, C, H, W]``, channels-last included).
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise InputError(f"DistributedBatchNorm expects an input [batch, channels, ...], got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_n = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims, dtype=torch.float64), local_n]))
        n = total[-1].detach()
        mean = total[:-1] / n
        sq = _AllReduceSum.apply(((x.double() - mean.view(shape)) ** 2).sum(dims))
        var = sq / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d) in ``module`` by a :class:`DistributedBatchNorm` holding the same
    parameter and buffer objects (so an optimizer built before still applies; in place for sub-modules; returns the
    converted module)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        new = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        return new.train(module.training)
    for name, child in module.named_children():
        converted = convert_distributed_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module

