"""Deprecated path: moved to :mod:`bestformer.data.transforms.batch`."""

import warnings

from ..data.transforms.batch import BatchAugment, box_mask, random_crop

warnings.warn("bestformer.training.augment is deprecated: import from bestformer.data.transforms",
              DeprecationWarning, stacklevel=2)

__all__ = ["BatchAugment", "box_mask", "random_crop"]
