"""Deprecated path: moved to :mod:`bestformer.training.dist` (and :mod:`bestformer.layers.norm` for the BatchNorm)."""

import warnings

from ..layers.norm import DistributedBatchNorm, convert_distributed_batchnorm
from .dist import *  # noqa: F403
from .dist import __all__ as _dist_all

warnings.warn("bestformer.training.distributed is deprecated: import from bestformer.training.dist",
              DeprecationWarning, stacklevel=2)

__all__ = [*_dist_all, "DistributedBatchNorm", "convert_distributed_batchnorm"]
