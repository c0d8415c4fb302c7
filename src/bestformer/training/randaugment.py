"""Deprecated path: moved to :mod:`bestformer.data.transforms` (``ops`` and ``randaugment``)."""

import warnings

from ..data.transforms.ops import LEVEL_DENOM, RAND_INCREASING_OPS, RAND_OPS, apply_op, list_ops, op_argument
from ..data.transforms.randaugment import RandAugment, RandAugmentDraw, parse_spec

warnings.warn("bestformer.training.randaugment is deprecated: import from bestformer.data.transforms",
              DeprecationWarning, stacklevel=2)

__all__ = ["LEVEL_DENOM", "RAND_INCREASING_OPS", "RAND_OPS", "RandAugment", "RandAugmentDraw", "apply_op", "list_ops",
           "op_argument", "parse_spec"]
