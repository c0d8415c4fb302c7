"""CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) from the canonical python-pickle batches or an image-folder layout.

Pickle batches are untrusted data: they are read by :func:`safe_unpickle`, which (1) walks the opcode stream
first without executing it, allowing only the opcodes a dict of lists, strings and numpy arrays needs, with
memo indices that cannot ask for huge tables, (2) runs the unpickler with a ``find_class`` that maps the
only globals a CIFAR batch references (numpy's array reconstruction, ``dtype``, ``_codecs.encode``) to inert
stand-ins, fresh for each load, that BUILD cannot change, and (3) replaces the array stand-ins in one pass that
visits every shared object once (a few hundred bytes of pickle can reference one list 2**30 times), refuses
cycles and stops after as many objects as the pickle has bytes. No numpy code runs on file data until the final,
checked ``np.frombuffer``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import BestformerError, FileFormatError
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

# Per-channel statistics of the training images (the values Spikformer's and BESTformer's CIFAR configs use).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# --------------------------------------------------------------------------------------- safe unpickling
# The binary opcodes of protocols 2-5 that a dict of lists, strings, numbers and numpy arrays needs (the
# canonical batches are protocol 2); no object construction (NEWOBJ, INST, OBJ), extensions or buffers.
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT",
    "BINSTRING", "SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
})
_NUMERIC_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}
_MAX_DEPTH = 32
_MAX_DIMS = 8


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a pickle: not callable, no attributes can be set on it."""

    __slots__ = ()


_NDARRAY = _NdarrayToken()


class _DtypeStub:
    """Stands for ``numpy.dtype(spec, align, copy)``; keeps the spec and the byte order of its state."""

    def __init__(self, spec: Any, *_: Any) -> None:
        if not isinstance(spec, str) or spec.lstrip("<>|=") not in _NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"array dtype {spec!r} is not a plain numeric type")
        self.spec, self.order = spec, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def dtype(self) -> np.dtype:
        spec = self.spec.lstrip("<>|=")
        return np.dtype(spec).newbyteorder(self.order if self.order != "|" else "=")


class _ArrayStub:
    """Stands for an ndarray under reconstruction: keeps shape, dtype and raw bytes for a checked rebuild."""

    def __init__(self) -> None:
        self.state: tuple[Any, ...] | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed array state")
        self.state = state

    def build(self, source: str) -> np.ndarray:
        if self.state is None:
            raise FileFormatError(f"{source}: an array in the pickle has no data")
        _, shape, dtype, fortran, raw = self.state
        return _checked_array(raw, dtype, shape, bool(fortran), source)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("array reconstruction of a type other than numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    stub = _ArrayStub()
    stub.state = (1, shape, dtype, order == "F", buf)
    return stub


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2: only ``(str, 'latin1')`` is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1-encoded byte strings are accepted")
    return text.encode("latin1")


def _checked_array(raw: Any, dtype: Any, shape: Any, fortran: bool, source: str) -> np.ndarray:
    if isinstance(raw, str):  # a Python 2 byte string, decoded as latin1 by the unpickler
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(dtype, _DtypeStub):
        raise FileFormatError(f"{source}: malformed array in the pickle")
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= len(raw) for d in shape):
        # every dimension of a non-empty array is at most its byte count; the shape's text may be huge: not shown
        raise FileFormatError(f"{source}: malformed array shape in the pickle (at most {_MAX_DIMS} dimensions of "
                              f"at most {len(raw)}, the bytes it holds)")
    dt = dtype.dtype()
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(raw):
        raise FileFormatError(f"{source}: array of shape {shape} needs {n * dt.itemsize} bytes, the pickle holds "
                              f"{len(raw)} (truncated or corrupt)")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")


class _StandIn:
    """A global of the pickle mapped to one of the checked functions above. BUILD cannot change it (a pickle could
    otherwise set attributes on this library's own functions for the rest of the process)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("the pickle tries to change a function it references")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("the pickle tries to change a function it references (BUILD)")


class _CifarUnpickler(pickle.Unpickler):
    _GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeStub,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never "
                                         "contains; refusing to load it") from None
        return found if found is _NDARRAY else _StandIn(found)


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without executing them: only allowed opcodes, memo indices below the opcode count."""
    with warnings.catch_warnings():  # genops decodes text opcodes' arguments, warning on bad escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if op.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(f"opcode {op.name} is not allowed in a CIFAR batch")
            if op.name in ("BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= count):
                raise pickle.UnpicklingError(f"memo index {arg!r} out of range")


class _Resolver:
    """Replaces array stand-ins by checked arrays through dicts, lists and tuples, visiting each shared object once
    (sharing is kept), refusing cycles, nesting deeper than :data:`_MAX_DEPTH` and more than ``budget`` objects."""

    def __init__(self, source: str, budget: int) -> None:
        self.source, self.budget = source, budget
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()
        self.keep: list[Any] = []  # holds the originals, so that their ids stay unique during the pass

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise FileFormatError(f"{self.source}: the pickle nests deeper than a CIFAR batch does")
        if isinstance(obj, (_DtypeStub, _NdarrayToken, _StandIn)):
            raise FileFormatError(f"{self.source}: a dtype, type or function object where data was expected")
        if not isinstance(obj, (_ArrayStub, dict, list, tuple)):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise FileFormatError(f"{self.source}: the pickle holds a container that contains itself")
        self.budget -= 1
        if self.budget < 0:
            raise FileFormatError(f"{self.source}: the pickle holds more objects than its size allows")
        self.active.add(key)
        self.keep.append(obj)
        if isinstance(obj, _ArrayStub):
            out: Any = obj.build(self.source)
        elif isinstance(obj, dict):
            out = {self(k, depth + 1): self(v, depth + 1) for k, v in obj.items()}
        else:
            out = type(obj)(self(v, depth + 1) for v in obj)
        self.active.discard(key)
        self.done[key] = out
        return out


def safe_unpickle(data: bytes, source: str = "<bytes>") -> Any:
    """Load a pickle that may only hold dicts, lists, tuples, numbers, strings and numeric numpy arrays.

    Python 2 pickles (the canonical CIFAR batches) are read with ``encoding="latin1"``. Anything else, and
    any corrupt or truncated stream, raises :class:`FileFormatError` naming ``source``.
    """
    try:
        _check_opcodes(data)
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except BestformerError:
        raise
    except Exception as err:  # any failure of the pickle machine on file bytes means a bad file
        raise FileFormatError(f"{source} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    try:
        return _Resolver(source, budget=len(data))(obj)
    except BestformerError:
        raise
    except (TypeError, ValueError, OverflowError) as err:  # e.g. an array used as a dict key (unhashable)
        raise FileFormatError(f"{source} is not a readable CIFAR pickle ({type(err).__name__})") from None


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
        files = tree.files()
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


def _from_cache(v: _Variant, root: Path) -> dict[str, Any] | None:
    """Decoded folder data saved by an earlier complete decode of the same source, if intact."""
    arrays = load_cached(_cache_name(v, root))
    if arrays is None or not {"images", "labels", "n_train", "class_names"} <= set(arrays):
        return None
    images, labels = arrays["images"], arrays["labels"]
    names = [str(c) for c in arrays["class_names"].tolist()]
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels) \
            or len(names) != v.num_classes or labels.min(initial=0) < 0 or labels.max(initial=0) >= v.num_classes:
        return None
    return {"images": images, "labels": labels.astype(np.int64), "n_train": int(arrays["n_train"]),
            "class_names": names}


def _build(v: _Variant, root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """Pickle batches (train / test as published) or image folders (test split only if ``test/`` exists).

    Decoded folder images are cached under ``$BESTFORMER_CACHE`` keyed by the source's path, size and mtime,
    written only after a complete decode (no ``limit`` / ``max_per_class``); the cache is read for any options.
    """
    assert root is not None
    cached = _from_cache(v, root)
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
        if needed.size == len(labels):
            save_cached(_cache_name(v, root), images=images, labels=labels, n_train=np.int64(n_train),
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
