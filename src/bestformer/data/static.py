"""Static image datasets: decoded arrays (digits, MNIST, CIFAR) and lazily decoded image folders.

Every item is ``(x, y)`` with ``x`` a float32 ``[C, H, W]`` tensor normalized per channel,
``(pixel / max_value - mean) / std``, and ``y`` an int label.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ..errors import FileFormatError
from .registry import BuildOptions, DatasetBundle, register_dataset
from .sources import FileTree, locate, top_prefixes
from .splits import SplitPlan, check_labels, plan_splits, stratified_split

#: ImageNet per-channel statistics (the convention of timm and torchvision for image folders)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: scikit-learn digits (pixels / 16) over all 1,797 images; checked against the data in the tests
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")


class ImageBatch(NamedTuple):
    """A batch fetched whole (:meth:`ImageArrayDataset.fetch`): ``x [B, C, H, W]``, ``y [B]``."""

    x: Tensor
    y: Tensor


def collate(batch: Any) -> Any:
    """DataLoader ``collate_fn``: a batch fetched whole passes through, a list of samples is stacked."""
    return batch if isinstance(batch, ImageBatch) else default_collate(batch)


class BatchedView(Dataset):
    """A dataset whose DataLoader fetches each batch with one call to ``dataset.fetch(indices)`` (PyTorch's
    ``__getitems__`` protocol); use it with ``collate_fn=collate``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        return self.dataset.fetch(indices)


def batched(dataset: Any) -> Any:
    """``dataset`` seen through :class:`BatchedView` when it can fetch whole batches, else itself."""
    return BatchedView(dataset) if callable(getattr(dataset, "fetch", None)) else dataset


class ImageArrayDataset(Dataset):
    """Images held in memory as ``uint8 [N, H, W, C]`` (decoded once, or read from the decoded-data cache);
    ``indices`` select the samples of a split.

    The split's pixels are kept as one ``uint8 [n, C, H, W]`` tensor, so a DataLoader fetches a whole batch with
    one indexing and one normalization (:meth:`fetch`, through :func:`batched` and :func:`collate`) instead of a
    Python call per image; both paths give identical tensors.

    Args:
        images, labels: the whole pool; ``indices`` the samples of this split, in order.
        mean, std: per-channel normalization after dividing by ``max_value`` (255, or 16 for digits).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], max_value: float = 255.0) -> None:
        self.images, self.labels, self.indices = images, labels, np.asarray(indices, dtype=np.int64)
        c = images.shape[-1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.max_value = float(max_value)
        self.pixels = torch.from_numpy(np.ascontiguousarray(images[self.indices])).permute(0, 3, 1, 2).contiguous()
        self.targets = torch.from_numpy(np.asarray(labels)[self.indices].astype(np.int64))

    def __len__(self) -> int:
        return int(self.indices.size)

    def _normalize(self, pixels: Tensor) -> Tensor:
        return (pixels.float() / self.max_value - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._normalize(self.pixels[i]), int(self.targets[i])

    def fetch(self, indices: Sequence[int]) -> ImageBatch:
        """The samples ``indices`` as one batch (equal to stacking ``self[i]``)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageBatch(self._normalize(self.pixels[idx]), self.targets[idx])


def decode_image(data: bytes, source: str, mode: str = "RGB") -> Image.Image:
    """Decode an image file fully (so that truncation is found here), as ``mode``; errors name ``source``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return img.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise FileFormatError(f"cannot decode image {source}: {err}") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bilinear, antialiased) and crop the central ``size x size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFileDataset(Dataset):
    """Images decoded from their files on every access (for data too large to hold decoded).

    Each image is converted to RGB, resized (short side) and center-cropped to ``img_size``, normalized.
    An unreadable image raises a :class:`FileFormatError` naming the file.
    """

    def __init__(self, tree: FileTree, names: Sequence[str], labels: np.ndarray, img_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.tree, self.names, self.labels, self.img_size = tree, list(names), np.asarray(labels), img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        name = self.names[i]
        img = resize_center_crop(decode_image(self.tree.read(name), self.tree.describe(name)), self.img_size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return (x / 255.0 - self.mean) / self.std, int(self.labels[i])


def array_splits(images: np.ndarray, labels: np.ndarray, plan: SplitPlan, mean: Sequence[float],
                 std: Sequence[float], max_value: float = 255.0) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """The three :class:`ImageArrayDataset` splits of a plan over one pool of images."""
    def make(idx: np.ndarray | None) -> Dataset | None:
        return None if idx is None else ImageArrayDataset(images, labels, idx, mean, std, max_value)

    return make(plan.train), make(plan.val), make(plan.test)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- class folders
def find_class_folders(files: list[str], split_dirs: Sequence[str] | None, suffixes: Sequence[str]) -> str | None:
    """Prefix (``""`` or one top folder) of a ``<split>/<class>/<file>`` layout, split folder names matched
    case-insensitively; with ``split_dirs=None``, of a ``<class>/<file>`` layout."""
    wanted = {s.lower() for s in split_dirs} if split_dirs is not None else None
    depth = 2 if wanted is None else 3
    for prefix in top_prefixes(files):
        for f in files:
            if not f.startswith(prefix):
                continue
            parts = f[len(prefix):].split("/")
            if len(parts) == depth and parts[-1].lower().endswith(tuple(suffixes)) \
                    and (wanted is None or parts[0].lower() in wanted):
                return prefix
    return None


def list_class_folders(files: list[str], prefix: str, split: str | None, suffixes: Sequence[str]
                       ) -> dict[str, list[str]] | None:
    """``{class: sorted file paths}`` of ``<prefix><split>/<class>/<file>`` (split case-insensitive; no split
    level when ``split`` is None), or ``None`` when that split folder does not exist. Other files are ignored."""
    classes: dict[str, list[str]] = {}
    found = split is None
    for f in files:
        if not f.startswith(prefix):
            continue
        parts = f[len(prefix):].split("/")
        if split is not None:
            if parts[0].lower() != split.lower() or parts[1:] == [""]:  # an empty split folder is no split
                continue
            found, parts = True, parts[1:]
        if len(parts) == 2:
            classes.setdefault(parts[0], [])
            if parts[1].lower().endswith(tuple(suffixes)):
                classes[parts[0]].append(f)
    if not found:
        return None
    return {c: sorted(v) for c, v in sorted(classes.items())}


def check_class_folders(folders: dict[str, list[str]] | None, where: str, num_classes: int | None = None,
                        class_names: Sequence[str] | None = None, kind: str = "image") -> dict[str, list[str]]:
    """Every class folder must hold ``kind`` files; the class count (or the class names) must be as expected."""
    if not folders:
        raise FileFormatError(f"{where}: no class folders with {kind} files")
    empty = [c for c, v in folders.items() if not v]
    if empty:
        raise FileFormatError(f"{where}/{empty[0]}: class folder holds no {kind} files")
    if num_classes is not None and len(folders) != num_classes:
        raise FileFormatError(f"{where}: found {len(folders)} class folders, expected {num_classes} "
                              f"({', '.join(list(folders)[:12])}{', ...' if len(folders) > 12 else ''})")
    if class_names is not None and list(folders) != list(class_names):
        extra = sorted(set(folders) - set(class_names))
        missing = sorted(set(class_names) - set(folders))
        raise FileFormatError(f"{where}: class folders differ from the training classes "
                              f"(unexpected {extra[:5]}, missing {missing[:5]})")
    return folders


def flatten_folders(folders: dict[str, list[str]], class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """File list and labels (alphabetical class index) of a ``{class: files}`` mapping."""
    index = {c: i for i, c in enumerate(class_names)}
    names = [f for c in folders for f in folders[c]]
    labels = np.array([index[c] for c in folders for _ in folders[c]], dtype=np.int64)
    return names, labels


# -------------------------------------------------------------------------------------------- builders
def _build_digits(root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """scikit-learn's 1,797 8x8 digits (values 0..16). There is no published test split: a stratified 20 %
    test split is carved with a fixed seed (0, whatever ``seed`` is, so test numbers stay comparable), then
    the validation split from the rest with ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[..., None]  # [N, 8, 8, 1], exact: values are integers 0..16
    labels = check_labels(bunch.target, 10, "sklearn digits")
    train_pool, test_pool = stratified_split(labels, 0.2, seed=0)
    plan = plan_splits(labels, train_pool, test_pool, val_fraction=opts.val_fraction, seed=opts.seed,
                       limit=opts.limit, max_per_class=opts.max_per_class)
    train, val, test = array_splits(images, labels, plan, DIGITS_MEAN, DIGITS_STD, max_value=16.0)
    return DatasetBundle("digits", train, val, test, 10, 1, 8, False, [str(i) for i in range(10)],
                         DIGITS_MEAN, DIGITS_STD, source="sklearn.datasets.load_digits")


_IMAGEFOLDER_EXPECTED = "ImageNet-style train/<class>/<image> and val/<class>/<image> folders"


def _build_imagefolder(root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """``train/<class>/*`` and ``val/<class>/*`` (and ``test/<class>/*`` when present), decoded lazily.

    Split policy: with only ``train/`` and ``val/``, the published ``val/`` folder is the held-out evaluation
    split (ImageNet's reported numbers are on it), so it becomes ``test`` and the validation split is carved
    from ``train/``. With a ``test/`` folder, ``test/`` is the test split and ``val/``, when present, the
    validation split as published (``val_fraction`` is then not used; without ``val/`` it is carved).
    Images are RGB, resized (short side) and center-cropped to ``img_size`` (default 224), ImageNet-normalized.
    """
    assert root is not None
    tree, prefix = locate(root, lambda files: find_class_folders(files, ("train",), IMAGE_SUFFIXES),
                          "image folder dataset", _IMAGEFOLDER_EXPECTED)
    files = tree.entries()  # empty class folders included
    train_dirs = check_class_folders(list_class_folders(files, prefix, "train", IMAGE_SUFFIXES),
                                     tree.describe(prefix + "train"))
    class_names = list(train_dirs)
    published = {}
    for split in ("val", "test"):
        dirs = list_class_folders(files, prefix, split, IMAGE_SUFFIXES)
        if dirs is not None:
            published[split] = check_class_folders(dirs, tree.describe(prefix + split), class_names=class_names)
    names, labels = flatten_folders(train_dirs, class_names)
    n_train = len(names)
    pools: dict[str, np.ndarray] = {}
    for split, dirs in published.items():
        more, more_labels = flatten_folders(dirs, class_names)
        pools[split] = np.arange(len(names), len(names) + len(more))
        names += more
        labels = np.concatenate([labels, more_labels])
    size = opts.img_size or 224
    if "test" in pools:  # a published val/ is then the validation split as it is
        test_pool, val_pool = pools["test"], pools.get("val")
    else:  # the published val/ is the evaluation split; validation is carved from train/
        test_pool, val_pool = pools.get("val"), None
    plan = plan_splits(labels, np.arange(n_train), test_pool, val_pool=val_pool, val_fraction=opts.val_fraction,
                       seed=opts.seed, limit=opts.limit, max_per_class=opts.max_per_class, class_names=class_names)

    def make(idx: np.ndarray | None) -> Dataset | None:
        if idx is None:
            return None
        return ImageFileDataset(tree, [names[i] for i in idx], labels[idx], size, IMAGENET_MEAN, IMAGENET_STD)

    return DatasetBundle("imagefolder", make(plan.train), make(plan.val), make(plan.test),  # type: ignore[arg-type]
                         len(class_names), 3, size, False, class_names, IMAGENET_MEAN, IMAGENET_STD,
                         source=tree.label)


register_dataset("digits", _build_digits, "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes)",
                 needs_files=False)
register_dataset("imagefolder", _build_imagefolder, _IMAGEFOLDER_EXPECTED, options=("img_size",))
