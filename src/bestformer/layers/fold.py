"""BatchNorm folding: an eval-mode BatchNorm after a linear or convolutional layer is one per-channel affine map.

In evaluation mode ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta`` (Ioffe & Szegedy 2015, Alg. 1 with the
running statistics), so ``BN(W x + b) = (g W) x + (beta + (b - mu) g)`` with ``g = gamma / sqrt(var + eps)``
per output channel. Two users need it in two roundings:

- :func:`fold_bn` folds it into the layer's weights and bias (the CSDformer conversion, NIR export);
- :func:`bn_kernel_constants` gives the per-channel ``(alpha, b)`` rounded as PyTorch's CPU BatchNorm kernel
  forms them, for the packed runtime, which must reproduce PyTorch's float32 result bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm,
            dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``BN(W x + b)`` in evaluation mode as one affine layer (module docstring):
    ``W' = W * g``, ``b' = beta + (b - mean) * g`` with ``g = gamma / sqrt(var + eps)`` per output channel.

    A missing ``bias`` counts as 0, a BatchNorm without affine parameters as ``gamma = 1``, ``beta = 0``.
    ``dtype``: round ``g`` and ``b'`` to this dtype before scaling the weight (NIR export keeps the weights'
    dtype); ``None`` keeps PyTorch's type promotion. Gradients flow unless called under ``torch.no_grad``.
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    g = bn.weight / std if bn.weight is not None else 1 / std
    shift = bn.bias if bn.bias is not None else torch.zeros_like(g)
    b = shift + ((bias if bias is not None else 0.0) - bn.running_mean) * g
    if dtype is not None:
        g, b = g.to(dtype), b.to(dtype)
    return weight * g.view(-1, *([1] * (weight.dim() - 1))), b


def bn_eval(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``bn(x)`` in evaluation mode (running statistics), leaving its training flag as it was."""
    training = bn.training
    bn.eval()
    try:
        return bn(x)
    finally:
        bn.train(training)


def bn_kernel_constants(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, b)`` of an eval-mode BatchNorm in float32, as PyTorch's CPU kernel forms them:
    ``alpha = gamma * (1 / sqrt(var + eps))`` and ``b = BN(0)`` (``= beta - mu alpha``, read back from PyTorch so
    that it is rounded as PyTorch rounds it)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ConfigError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    var = bn.running_var.detach().cpu().float().numpy()
    gamma = bn.weight.detach().cpu().float().numpy() if bn.weight is not None else np.ones_like(var)
    inv = np.float32(1) / np.sqrt(var + np.float32(bn.eps))
    alpha = (inv * gamma).astype(np.float32)
    zero = torch.zeros(1, bn.num_features, *([1, 1] if isinstance(bn, nn.BatchNorm2d) else []))
    with torch.no_grad():
        beta = bn_eval(bn, zero).reshape(-1).numpy().astype(np.float32)
    return alpha, beta
