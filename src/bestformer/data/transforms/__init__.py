"""Batch transforms in torch, on the device that holds the batch: RandAugment (:mod:`.ops` the image operations,
:mod:`.randaugment` the policy) and the training-time batch augmentation (:mod:`.batch`: crop, flip, random
erasing, mixup, cutmix)."""

from .batch import BatchAugment, box_mask, random_crop
from .ops import RAND_INCREASING_OPS, RAND_OPS, apply_op, list_ops, op_argument
from .randaugment import RandAugment, RandAugmentDraw, parse_spec

__all__ = [
    "RAND_INCREASING_OPS",
    "RAND_OPS",
    "BatchAugment",
    "RandAugment",
    "RandAugmentDraw",
    "apply_op",
    "box_mask",
    "list_ops",
    "op_argument",
    "parse_spec",
    "random_crop",
]
