"""Datasets: ``build_datasets(name, data_dir, ...)`` gives train / validation / test splits ready for a model.

Static images (``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder``) yield normalized ``[C, H, W]``
tensors; event datasets (``nmnist``, ``cifar10dvs``) yield ``[T, 2, H, W]`` event-count frames, which a
DataLoader stacks to ``[B, T, C, H, W]`` and :func:`time_first` turns into the models' ``[T, B, C, H, W]``.
Importing this package registers every dataset.
"""

from . import cifar, events, idx, static
from .cifar import parse_cifar_batch, read_cifar_batch
from .events import EventFileDataset, Events, decode_aedat, decode_nmnist, events_to_frames, read_aedat, read_nmnist
from .idx import parse_idx, read_idx
from .registry import (
    BuildOptions,
    DatasetBundle,
    build_datasets,
    dataset_summary,
    default_data_dir,
    is_event_dataset,
    list_datasets,
    register_dataset,
    time_first,
)
from .sources import cache_dir
from .splits import interleave_classes, stratified_split
from .static import BatchedView, ImageArrayDataset, ImageBatch, ImageFileDataset, batched, collate
from .unpickle import safe_unpickle

__all__ = [
    "BatchedView",
    "BuildOptions",
    "DatasetBundle",
    "EventFileDataset",
    "Events",
    "ImageArrayDataset",
    "ImageBatch",
    "ImageFileDataset",
    "batched",
    "build_datasets",
    "cache_dir",
    "cifar",
    "collate",
    "dataset_summary",
    "decode_aedat",
    "decode_nmnist",
    "default_data_dir",
    "events",
    "events_to_frames",
    "idx",
    "interleave_classes",
    "is_event_dataset",
    "list_datasets",
    "parse_cifar_batch",
    "parse_idx",
    "read_aedat",
    "read_cifar_batch",
    "read_idx",
    "read_nmnist",
    "register_dataset",
    "safe_unpickle",
    "static",
    "stratified_split",
    "time_first",
]
