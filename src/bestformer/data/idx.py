"""The IDX format (LeCun et al.'s MNIST files) and the ``mnist`` dataset.

IDX: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
the number of dimensions, then each dimension as a big-endian uint32, then the data, big-endian, row-major.
Files may be gzipped. The parser checks the header, the dimensions and that the data fills the file exactly;
it never allocates more than the file can hold, so a corrupt header cannot ask for gigabytes.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import FileFormatError
from .registry import BuildOptions, DatasetBundle, register_dataset
from .splits import check_labels, plan_splits
from .static import array_splits

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 24
#: deflate cannot expand data more than ~1032 : 1, which bounds what a gzipped file may hold
_MAX_DEFLATE_RATIO = 1032

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_exact(stream: BinaryIO, n: int, source: str, what: str) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks (nothing is allocated ahead of the data)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(min(_CHUNK, n - got))
        if not chunk:
            raise FileFormatError(f"IDX file {source} is truncated: {what} needs {n} bytes, found {got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file (raw or gzipped bytes) into a native-endian numpy array; errors name ``source``."""
    gzipped = data[:2] == b"\x1f\x8b"
    stream: BinaryIO = gzip.GzipFile(fileobj=io.BytesIO(data)) if gzipped else io.BytesIO(data)
    try:
        head = _read_exact(stream, 4, source, "the header")
        if head[:2] != b"\x00\x00" or head[2] not in _IDX_TYPES or head[3] == 0:
            raise FileFormatError(f"{source} is not an IDX file (magic bytes {head.hex()}; expected 0000 then a "
                                  "type byte 08/09/0b/0c/0d/0e and the number of dimensions)")
        dtype = np.dtype(_IDX_TYPES[head[2]])
        dims = tuple(int(d) for d in np.frombuffer(_read_exact(stream, 4 * head[3], source, "the dimensions"),
                                                   dtype=">u4"))
        nbytes = math.prod(dims) * dtype.itemsize
        limit = len(data) * (_MAX_DEFLATE_RATIO if gzipped else 1)
        if nbytes > limit:
            raise FileFormatError(f"IDX file {source} is truncated: its header declares dimensions {dims} "
                                  f"({nbytes} bytes of data) but the file has {len(data)} bytes")
        body = _read_exact(stream, nbytes, source, f"data of dimensions {dims}")
        if stream.read(1):
            raise FileFormatError(f"IDX file {source} has trailing bytes after the {dims} data its header declares")
    except (OSError, EOFError, zlib.error) as err:  # OSError includes gzip.BadGzipFile (bad header or CRC)
        raise FileFormatError(f"IDX file {source} is a corrupt or truncated gzip file ({err})") from None
    try:
        return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(dims)
    except ValueError as err:  # e.g. a zero dimension beside dimensions whose product numpy cannot index
        raise FileFormatError(f"IDX file {source} declares dimensions {dims[:8]} numpy cannot hold ({err})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) with full validation; see :func:`parse_idx`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileFormatError(f"cannot read IDX file {path}: {err.strerror or err}") from None
    return parse_idx(data, str(path))


def find_mnist_file(root: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``root`` or in torchvision's ``root/MNIST/raw``."""
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileFormatError(f"MNIST file {stem}(.gz) not found in {root}: expected the four IDX files "
                          f"{', '.join(MNIST_FILES.values())} (gzipped or not); pass download=True (--download) to "
                          "fetch them")


def load_mnist_arrays(root: Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays, checked against each other: uint8 images ``[N, H, W]``, labels ``[N]`` in 0..9."""
    paths = {key: find_mnist_file(root, stem) for key, stem in MNIST_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    shapes = []
    for split in ("train", "test"):
        img_key, lab_key = f"{split}_images", f"{split}_labels"
        img_file, lab_file = paths[img_key], paths[lab_key]
        images, labels = arrays[img_key], arrays[lab_key]
        if images.dtype != np.uint8 or images.ndim != 3:
            raise FileFormatError(f"{img_file}: expected uint8 images of 3 dimensions [N, H, W], got "
                                  f"{images.dtype} of shape {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise FileFormatError(f"{lab_file}: expected uint8 labels of 1 dimension [N], got "
                                  f"{labels.dtype} of shape {labels.shape}")
        if len(images) != len(labels):
            raise FileFormatError(f"{img_file} holds {len(images)} images but {lab_file} {len(labels)} labels")
        if len(images) == 0:
            raise FileFormatError(f"{img_file} holds no images")
        arrays[lab_key] = check_labels(labels, 10, str(lab_file))
        shapes.append(images.shape[1:])
    if shapes[0] != shapes[1] or shapes[0][0] != shapes[0][1]:
        raise FileFormatError(f"MNIST images in {root} must be square and the same size in train and test, got "
                              f"{shapes[0]} and {shapes[1]}")
    return arrays


def _build_mnist(root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """The 60,000 / 10,000 MNIST split as published; validation carved from the 60,000."""
    assert root is not None
    a = load_mnist_arrays(root)
    images = np.concatenate([a["train_images"], a["test_images"]])[..., None]
    labels = np.concatenate([a["train_labels"], a["test_labels"]])
    n_train = len(a["train_labels"])
    plan = plan_splits(labels, np.arange(n_train), np.arange(n_train, len(labels)), val_fraction=opts.val_fraction,
                       seed=opts.seed, limit=opts.limit, max_per_class=opts.max_per_class)
    train, val, test = array_splits(images, labels, plan, MNIST_MEAN, MNIST_STD)
    return DatasetBundle("mnist", train, val, test, 10, 1, int(images.shape[1]), False, [str(i) for i in range(10)],
                         MNIST_MEAN, MNIST_STD, source=str(root))


def _download_mnist(root: Path) -> None:
    """Fetch the gzipped IDX files that are not already in ``root`` (gzipped or not)."""
    from .download import fetch_all

    fetch_all("mnist", root, present=lambda name: (root / name).is_file() or (root / name[:-3]).is_file())


register_dataset("mnist", _build_mnist, "MNIST: the four IDX files train-images-idx3-ubyte(.gz), "
                 "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)",
                 downloader=_download_mnist)
