"""CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) from the canonical python-pickle batches or an image-folder layout.

Pickle batches are untrusted data: they are read by :func:`~bestformer.data.unpickle.safe_unpickle`, which allows
only dicts, lists, strings, numbers and numeric numpy arrays and runs no code from the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileFormatError
from ..progress import progress_bar
from .registry import BuildOptions, DatasetBundle, register_dataset
from .sources import FileTree, fingerprint, load_cached, locate, save_cached, top_prefixes
from .splits import check_labels, plan_splits
from .static import (
    IMAGE_SUFFIXES,
    array_splits,
    check_class_folders,
    decode_image,
    find_class_folders,
    flatten_folders,
    list_class_folders,
)
from .unpickle import safe_unpickle

# Per-channel statistics of the training images (the values Spikformer's and BESTformer's CIFAR configs use).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _str_keys(obj: Any, source: str) -> dict[Any, Any]:
    """A pickled dict with ``bytes`` keys (Python 3 writers of the old format) decoded to ``str``."""
    if not isinstance(obj, dict):
        raise FileFormatError(f"{source}: expected a dict (a CIFAR batch), got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_cifar_batch(data: bytes, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> ``(uint8 images [N, 32, 32, 3], int64 labels [N])``.

    The batch is a dict with ``data`` (uint8 ``[N, 3072]``: 1024 red, 1024 green, 1024 blue values, rows of 32)
    and ``label_key`` (``labels`` for CIFAR-10, ``fine_labels`` for CIFAR-100).
    """
    batch = _str_keys(safe_unpickle(data, source), source)
    for key in ("data", label_key):
        if key not in batch:
            raise FileFormatError(f"{source}: the batch has no {key!r} entry (keys: {sorted(map(str, batch))})")
    images = batch["data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3072:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise FileFormatError(f"{source}: 'data' must be uint8 [N, 3072], got {desc}")
    raw_labels = batch[label_key]
    if isinstance(raw_labels, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
        raise FileFormatError(f"{source}: {label_key!r} must hold integers")
    labels = check_labels(np.asarray(raw_labels), num_classes, source)
    if len(labels) != len(images):
        raise FileFormatError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar_batch(path: str | Path, label_key: str = "labels", num_classes: int = 10
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR python batch file safely; see :func:`parse_cifar_batch`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileFormatError(f"cannot read CIFAR batch {path}: {err.strerror or err}") from None
    return parse_cifar_batch(data, str(path), label_key, num_classes)


# -------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class _Variant:
    """What differs between CIFAR-10 and CIFAR-100: names of the batch files and keys, statistics."""

    name: str
    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    meta_file: str
    meta_key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def find_pickles(self, files: list[str]) -> str | None:
        names = set(files)
        for prefix in top_prefixes(files):
            if all(prefix + f in names for f in [*self.train_files, self.test_file]):
                return prefix
        return None


_CIFAR10 = _Variant("cifar10", 10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                    "labels", "batches.meta", "label_names", CIFAR10_MEAN, CIFAR10_STD)
_CIFAR100 = _Variant("cifar100", 100, "cifar-100-python", ("train",), "test", "fine_labels", "meta",
                     "fine_label_names", CIFAR100_MEAN, CIFAR100_STD)


def _class_names_from_meta(tree: FileTree, prefix: str, v: _Variant) -> list[str]:
    """Class names from the batches' meta file when present, else CIFAR-10's list / the label numbers."""
    if prefix + v.meta_file in tree.files():
        where = tree.describe(prefix + v.meta_file)
        names = _str_keys(safe_unpickle(tree.read(prefix + v.meta_file), where), where).get(v.meta_key)
        if isinstance(names, list):  # bytes names too: the writers of bytes keys write bytes names
            names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
        if isinstance(names, list) and len(names) == v.num_classes and all(isinstance(n, str) for n in names):
            return names
        raise FileFormatError(f"{where}: expected {v.num_classes} class names under {v.meta_key!r}")
    return list(CIFAR10_CLASSES) if v.num_classes == 10 else [str(i) for i in range(v.num_classes)]


def _read_pickles(tree: FileTree, prefix: str, v: _Variant) -> tuple[np.ndarray, np.ndarray, int]:
    parts = [parse_cifar_batch(tree.read(prefix + f), tree.describe(prefix + f), v.label_key, v.num_classes)
             for f in [*v.train_files, v.test_file]]
    n_train = sum(len(p[1]) for p in parts[:-1])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), n_train


def _decode_folder_images(tree: FileTree, names: list[str], needed: np.ndarray, what: str) -> np.ndarray:
    """Decode the images ``names[needed]`` (32x32 each, converted to RGB) into uint8 ``[N, 32, 32, 3]``.

    Rows not in ``needed`` stay zero (their pages are never touched, so they cost no memory).
    """
    images = np.zeros((len(names), 32, 32, 3), dtype=np.uint8)
    for i in progress_bar(needed.tolist(), desc=f"decoding {what}", unit="img", leave=False,
                          disable=len(needed) < 2000):
        img = decode_image(tree.read(names[i]), tree.describe(names[i]))
        if img.size != (32, 32):
            raise FileFormatError(f"{tree.describe(names[i])} is {img.size[0]}x{img.size[1]}; CIFAR images "
                                  "are 32x32")
        images[i] = np.asarray(img)
    return images


class _FolderData:
    """An image-folder CIFAR layout: file names and labels, decoded on demand (and cached when complete)."""

    def __init__(self, v: _Variant, tree: FileTree, prefix: str) -> None:
        files = tree.entries()  # empty class folders included
        train = check_class_folders(list_class_folders(files, prefix, "train", IMAGE_SUFFIXES),
                                    tree.describe(prefix + "train"), num_classes=v.num_classes)
        self.class_names = list(train)
        self.names, self.labels = flatten_folders(train, self.class_names)
        self.n_train = len(self.names)
        test = list_class_folders(files, prefix, "test", IMAGE_SUFFIXES)
        self.has_test = test is not None
        if test is not None:
            test = check_class_folders(test, tree.describe(prefix + "test"), class_names=self.class_names)
            more, more_labels = flatten_folders(test, self.class_names)
            self.names += more
            self.labels = np.concatenate([self.labels, more_labels])
        self.tree = tree


def _cache_name(v: _Variant, root: Path) -> str:
    return f"{v.name}-images-{fingerprint(root)}.npz"


def _from_cache(v: _Variant, name: str) -> dict[str, Any] | None:
    """Decoded folder data saved (as ``name``) by an earlier complete decode of the same source, if intact."""
    arrays = load_cached(name)
    if arrays is None or not {"images", "labels", "n_train", "class_names"} <= set(arrays):
        return None
    images, labels = arrays["images"], arrays["labels"]
    names = [str(c) for c in arrays["class_names"].tolist()]
    n_train = arrays["n_train"]
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.ndim != 1 \
            or labels.dtype.kind not in "iu" or len(images) != len(labels) or len(names) != v.num_classes \
            or labels.min(initial=0) < 0 or labels.max(initial=0) >= v.num_classes \
            or n_train.shape != () or n_train.dtype.kind not in "iu" or not 1 <= int(n_train) <= len(labels):
        return None  # a stale or damaged cache is rebuilt from the source
    return {"images": images, "labels": labels.astype(np.int64), "n_train": int(n_train), "class_names": names}


def _build(v: _Variant, root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """Pickle batches (train / test as published) or image folders (test split only if ``test/`` exists).

    Decoded folder images are cached under ``$BESTFORMER_CACHE`` keyed by the source's path, size and mtime,
    written only after a complete decode (no ``limit`` / ``max_per_class``) of a source that did not change while
    it was read (the key is taken before and after); the cache is read for any options.
    """
    assert root is not None
    cache_name = _cache_name(v, root)  # before the files are listed: a source changing while it is read is not saved
    cached = _from_cache(v, cache_name)
    if cached is not None:
        images, labels, n_train = cached["images"], cached["labels"], cached["n_train"]
        class_names, source, folder = cached["class_names"], f"{root} (decoded cache)", None
        test_pool: np.ndarray | None = np.arange(n_train, len(labels)) if n_train < len(labels) else None
    else:
        def find(files: list[str]) -> str | None:
            prefix = v.find_pickles(files)
            return prefix if prefix is not None else find_class_folders(files, ("train",), IMAGE_SUFFIXES)

        tree, prefix = locate(root, find, f"{v.name} data",
                              f"the python batches ({v.folder}/, or its .tar.gz) or image folders "
                              "train/<class>/*.jpg (and optionally test/<class>/), as a folder or a .tar.gz")
        source, folder = tree.label, None
        if v.find_pickles(tree.files()) == prefix:
            images, labels, n_train = _read_pickles(tree, prefix, v)
            class_names = _class_names_from_meta(tree, prefix, v)
            test_pool = np.arange(n_train, len(labels))
        else:
            folder = _FolderData(v, tree, prefix)
            labels, n_train, class_names = folder.labels, folder.n_train, folder.class_names
            test_pool = np.arange(n_train, len(labels)) if folder.has_test else None
    plan = plan_splits(labels, np.arange(n_train), test_pool, val_fraction=opts.val_fraction, seed=opts.seed,
                       limit=opts.limit, max_per_class=opts.max_per_class, class_names=class_names)
    if folder is not None:
        needed = plan.needed()
        images = _decode_folder_images(folder.tree, folder.names, needed, v.name)
        if needed.size == len(labels) and _cache_name(v, root) == cache_name:
            save_cached(cache_name, images=images, labels=labels, n_train=np.int64(n_train),
                        class_names=np.array(class_names))
    train, val, test = array_splits(images, labels, plan, v.mean, v.std)
    return DatasetBundle(v.name, train, val, test, v.num_classes, 3, 32, False, class_names, v.mean, v.std,
                         source=source)


def _downloader(v: _Variant) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        """Fetch the canonical archive unless the batches or the archive are already in ``root``."""
        from .download import RESOURCES, fetch_all

        archive = RESOURCES[v.name][1][0][0]
        fetch_all(v.name, root, present=lambda _: (root / v.folder).is_dir() or (root / archive).is_file())

    return download


for _v in (_CIFAR10, _CIFAR100):
    register_dataset(_v.name, lambda root, opts, v=_v: _build(v, root, opts),
                     f"{_v.name.upper()}: python batches ({_v.folder}/ or its .tar.gz) or image folders "
                     "train/<class>/*.jpg (folder or .tar.gz)", downloader=_downloader(_v))
