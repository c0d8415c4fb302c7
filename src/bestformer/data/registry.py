"""Dataset registry: ``build_datasets(name, data_dir, ...)`` returns a :class:`DatasetBundle` of splits.

Each dataset module registers a builder ``builder(root, options) -> DatasetBundle`` with
:func:`register_dataset`; ``build_datasets`` validates the options once, resolves ``data_dir``, runs the
download when (and only when) it is asked for, and checks the bundle it gets back.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, FileFormatError, InputError, check_choice


@dataclass
class DatasetBundle:
    """The splits of one dataset and what a model needs to know about them.

    ``train``, ``val``, ``test`` yield ``(x, y)``: ``x`` a float32 tensor (``[C, H, W]`` normalized with
    ``mean``/``std`` for images, ``[T, 2, H, W]`` event counts for event datasets), ``y`` an int label.
    ``val`` is ``None`` when ``val_fraction=0``; ``test`` is ``None`` when the data has no held-out split.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    in_channels: int
    img_size: int
    is_event: bool
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    def describe(self) -> str:
        """One line for logs: split sizes, classes, input shape and where the data was read from."""
        sizes = ", ".join(f"{k} {len(v) if v is not None else '-'}"  # type: ignore[arg-type]
                          for k, v in (("train", self.train), ("val", self.val), ("test", self.test)))
        kind = "event frames" if self.is_event else "images"
        where = f" from {self.source}" if self.source else ""
        return (f"{self.name}: {sizes}; {self.num_classes} classes; {kind} "
                f"{self.in_channels}x{self.img_size}x{self.img_size}{where}")


@dataclass(frozen=True)
class BuildOptions:
    """The options of :func:`build_datasets`, validated (see its docstring)."""

    time_steps: int = 4
    split_by: str = "number"
    val_fraction: float = 0.1
    seed: int = 0
    download: bool = False
    limit: int | None = None
    img_size: int | None = None
    max_per_class: int | None = None
    event_transform: Callable[[Any], Any] | None = None  #: event datasets: a tonic transform per recording

    def __post_init__(self) -> None:
        def positive(key: str, val: object, optional: bool) -> None:
            if optional and val is None:
                return
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ConfigError(f"{key} must be an integer >= 1{' or None' if optional else ''}, got {val!r}")

        positive("time_steps", self.time_steps, False)
        positive("limit", self.limit, True)
        positive("img_size", self.img_size, True)
        positive("max_per_class", self.max_per_class, True)
        check_choice("split_by", self.split_by, ("number", "time"))
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder, whether it reads files, and its optional downloader."""

    name: str
    builder: Callable[[Path | None, BuildOptions], DatasetBundle]
    summary: str
    needs_files: bool = True
    downloader: Callable[[Path], None] | None = None
    options: tuple[str, ...] = ()
    events: bool = False  #: samples are event frames [T, C, H, W] (models then take [T, B, C, H, W])


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, builder: Callable[[Path | None, BuildOptions], DatasetBundle], summary: str, *,
                     needs_files: bool = True, downloader: Callable[[Path], None] | None = None,
                     options: tuple[str, ...] = (), events: bool = False) -> None:
    """Make ``name`` buildable. ``options`` lists the optional keywords (``img_size``) the builder honours;
    ``events``: its samples are event frames."""
    _DATASETS[name] = DatasetSpec(name, builder, summary, needs_files, downloader, options, events)


def is_event_dataset(name: str) -> bool:
    """Whether dataset ``name``'s samples are event frames (``[T, C, H, W]``) rather than images."""
    return _DATASETS[check_choice("dataset", name, _DATASETS)].events


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style wildcard, sorted."""
    return sorted(n for n in _DATASETS if fnmatch.fnmatchcase(n, pattern))


def dataset_summary(name: str) -> str:
    """One line on what ``name`` reads (for help texts)."""
    return _DATASETS[check_choice("dataset", name, _DATASETS)].summary


def default_data_dir(name: str) -> Path:
    """Where a dataset is looked for (and downloaded to) when no ``data_dir`` is given:
    ``$BESTFORMER_DATA/<name>``, default ``~/.cache/bestformer/data/<name>``."""
    return Path(os.environ.get("BESTFORMER_DATA", "~/.cache/bestformer/data")).expanduser() / name


def build_datasets(name: str, data_dir: str | os.PathLike[str] | None = None, *, time_steps: int = 4,
                   split_by: str = "number", val_fraction: float = 0.1, seed: int = 0, download: bool = False,
                   limit: int | None = None, img_size: int | None = None,
                   max_per_class: int | None = None,
                   event_transform: Callable[[Any], Any] | None = None) -> DatasetBundle:
    """Read dataset ``name`` from ``data_dir`` and return its train / validation / test splits.

    Args:
        name: one of :func:`list_datasets` (``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder``,
            ``nmnist``, ``cifar10dvs``).
        data_dir: a folder (or an archive) in the dataset's standard layout; default
            :func:`default_data_dir`. ``digits`` reads no files and takes none.
        time_steps, split_by: event datasets only: ``T`` frames per sample, binned by equal event count
            (``"number"``, the reference's choice) or equal time windows (``"time"``); see
            :func:`bestformer.data.events_to_frames`.
        val_fraction: share of the training data carved out (seeded, stratified) as the validation split;
            0 gives ``val=None``. The test split is never used for selection.
        seed: seed of the validation carve (the digits test carve is fixed, so it never moves with the seed).
        download: fetch missing MNIST / CIFAR files into ``data_dir`` first (never happens unless asked).
        limit: cap every split to its first ``limit`` samples after the split (splits are ordered
            round-robin over classes, so a prefix is class-balanced).
        img_size: ``imagefolder`` only: side of the square the images are resized and cropped to (224).
        max_per_class: keep only the first ``n`` samples of each class of each published split before
            splitting (sorted file order), so that e.g. only ``10 n`` CIFAR JPEGs are decoded.
        event_transform: event datasets only: a tonic transform (any callable) applied to every recording as a
            structured array (``x``, ``y``, ``t``, ``p``); it returns events (framed afterwards) or frames
            ``[T, 2, H, W]`` (used as they are). See :mod:`bestformer.data.tonic_interop`.
    """
    if event_transform is not None and not is_event_dataset(name):
        events = ", ".join(n for n, s in _DATASETS.items() if s.events)
        raise ConfigError(f"event_transform applies to the event datasets ({events}); {name} holds images")
    spec = _DATASETS[check_choice("dataset", name, _DATASETS)]
    opts = BuildOptions(time_steps=time_steps, split_by=split_by, val_fraction=val_fraction, seed=seed,
                        download=download, limit=limit, img_size=img_size, max_per_class=max_per_class,
                        event_transform=event_transform)
    if img_size is not None and "img_size" not in spec.options:
        raise ConfigError(f"img_size applies to {', '.join(n for n, s in _DATASETS.items() if 'img_size' in s.options)}"
                          f" only; {name} has a fixed image size")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ConfigError(f"data_dir must be a path, got {type(data_dir).__name__}")
    root: Path | None = None
    if spec.needs_files:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    elif data_dir is not None:
        raise ConfigError(f"{name} is bundled with its library and reads no files; drop data_dir={str(data_dir)!r}")
    if download:
        if spec.downloader is None:
            raise ConfigError(f"{name} cannot be downloaded by bestformer; put its files in data_dir "
                              f"({spec.summary})")
        spec.downloader(root)  # type: ignore[arg-type]
    bundle = spec.builder(root, opts)
    for split in ("train", "val", "test"):
        ds = getattr(bundle, split)
        if ds is not None and len(ds) == 0:  # type: ignore[arg-type]
            raise InputError(f"{name}: the {split} split is empty")
    if len(bundle.class_names) != bundle.num_classes:
        raise FileFormatError(f"{name}: {len(bundle.class_names)} class names for {bundle.num_classes} classes")
    return bundle


def time_first(x: Tensor) -> Tensor:
    """Batch of event frames ``[B, T, C, H, W]`` (as a DataLoader stacks them) -> the models' ``[T, B, C, H, W]``.

    A batch of static images ``[B, C, H, W]`` is returned unchanged (the model repeats it over ``T``), so a
    training loop may call this on every batch.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"time_first expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 5:
        return x.transpose(0, 1)
    if x.dim() == 4:
        return x
    raise InputError(f"time_first expects event frames [B, T, C, H, W] or images [B, C, H, W], "
                     f"got shape {tuple(x.shape)}")
