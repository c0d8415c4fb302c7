"""Event-camera datasets: N-MNIST and CIFAR10-DVS recordings binned into ``T`` two-channel count frames.

File formats (both checked against the dataset authors' descriptions):

- N-MNIST (Orchard et al., 2015): 5 bytes (40 bits) per event, big-endian: bits 39-32 x, bits 31-24 y,
  bit 23 polarity (0 OFF, 1 ON), bits 22-0 timestamp in microseconds. The authors' reader also treats
  ``y == 240`` as a timestamp-overflow marker that adds 2^13 us to every later event; we do the same.
- CIFAR10-DVS (Li et al., 2017): jAER AEDAT 2.0 files: header lines starting with ``#`` (the first is
  ``#!AER-DAT2.0``), then 8 bytes per event, a big-endian int32 address and an int32 timestamp (us). The
  DVS128 address holds the polarity in bit 0, x in bits 1-7, y in bits 8-14. Coordinates and polarity are
  mapped as the reference code's loader (SpikingJelly's CIFAR10DVS) does: ``x = 127 - y_raw``,
  ``y = 127 - x_raw``, ``p = 1 - bit0``, so frames match the ones the reported models were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, FileFormatError, InputError, check_choice
from .registry import BuildOptions, DatasetBundle, register_dataset
from .sources import FileTree, locate
from .splits import plan_splits
from .static import check_class_folders, find_class_folders, flatten_folders, list_class_folders

EVENT_MEAN, EVENT_STD = (0.0, 0.0), (1.0, 1.0)
NMNIST_SIZE, DVS128_SIZE = 34, 128
_NMNIST_OVERFLOW_Y, _NMNIST_OVERFLOW_US = 240, 1 << 13


class Events(NamedTuple):
    """One recording: integer ``x``, ``y`` (pixels), ``p`` (polarity 0/1), ``t`` (microseconds), all ``[N]``."""

    x: np.ndarray
    y: np.ndarray
    p: np.ndarray
    t: np.ndarray


def _as_array(v: object, name: str) -> np.ndarray:
    arr = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
    if arr.ndim != 1:
        raise InputError(f"events_to_frames: {name} must be 1-D, got shape {arr.shape}")
    return arr


def frame_index(t: np.ndarray, time_steps: int, split_by: str) -> np.ndarray:
    """Frame (0..T-1) of each event, events given in time order for ``"number"``.

    ``"number"`` (the reference's ``split_by='number'``): frame ``i`` holds events ``[i * (N // T),
    (i + 1) * (N // T))`` and the last frame also the remainder (all events when ``N < T``).
    ``"time"``: ``T`` equal windows spanning the first to the last timestamp, ``[t0 + i*S/T, t0 + (i+1)*S/T)``
    with the last one closed (our definition; the reference floors the window to whole microseconds and
    gives the rest to the last frame). When all events share one timestamp they all fall in frame 0.
    """
    n = t.size
    if split_by == "number":
        chunk = n // time_steps
        if chunk == 0:
            return np.full(n, time_steps - 1, dtype=np.int64)
        return np.minimum(np.arange(n, dtype=np.int64) // chunk, time_steps - 1)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = t.min(), t.max()
    if lo == hi:
        return np.zeros(n, dtype=np.int64)
    if np.issubdtype(t.dtype, np.integer):  # exact, in int64: a narrow input dtype would overflow the span
        k = (t.astype(np.int64) - int(lo)) * time_steps // (int(hi) - int(lo))
    else:
        t64 = t.astype(np.float64)
        k = np.floor((t64 - float(lo)) * time_steps / (float(hi) - float(lo))).astype(np.int64)
    return np.minimum(k, time_steps - 1)


def events_to_frames(x: object, y: object, p: object, t: object, time_steps: int, height: int, width: int,
                     split_by: str = "number") -> Tensor:
    """Bin events into ``T`` frames of per-pixel, per-polarity event counts: float32 ``[T, 2, height, width]``.

    Frame ``f[k, p, y, x]`` counts the events of polarity ``p`` at pixel ``(x, y)`` that fall in frame ``k``
    (see :func:`frame_index` for ``split_by="number"`` / ``"time"``). For ``"number"`` the chunks follow time
    order: events are stably sorted by ``t`` first when the recording is not already in time order.
    Arguments may be numpy arrays, tensors or lists; ``t`` integer or float.
    """
    for key, val in (("time_steps", time_steps), ("height", height), ("width", width)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ConfigError(f"events_to_frames: {key} must be an integer >= 1, got {val!r}")
    check_choice("split_by", split_by, ("number", "time"))
    xs, ys, ps, ts = (_as_array(v, n) for v, n in ((x, "x"), (y, "y"), (p, "p"), (t, "t")))
    if not xs.size == ys.size == ps.size == ts.size:
        raise InputError(f"events_to_frames: x, y, p, t must have one entry per event, got lengths "
                         f"{xs.size}, {ys.size}, {ps.size}, {ts.size}")
    for name, arr in (("x", xs), ("y", ys), ("p", ps)):
        if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise InputError(f"events_to_frames: {name} must hold integers, got {arr.dtype}")
    if ts.size and not (np.issubdtype(ts.dtype, np.integer) or np.issubdtype(ts.dtype, np.floating)):
        raise InputError(f"events_to_frames: t must be numeric, got {ts.dtype}")
    if ts.size and np.issubdtype(ts.dtype, np.floating) and not np.isfinite(ts).all():
        raise InputError("events_to_frames: t holds NaN or infinite timestamps")
    xs, ys, ps = (a.astype(np.int64, copy=False) for a in (xs, ys, ps))
    for name, arr, hi in (("x", xs, width), ("y", ys, height), ("p", ps, 2)):
        if arr.size and (arr.min() < 0 or arr.max() >= hi):
            bad = np.flatnonzero((arr < 0) | (arr >= hi))
            raise InputError(f"events_to_frames: event {int(bad[0])} has {name}={int(arr[bad[0]])}, expected "
                             f"0..{hi - 1}")
    if split_by == "number" and ts.size > 1 and (ts[1:] < ts[:-1]).any():  # np.diff wraps on unsigned t
        order = np.argsort(ts, kind="stable")
        xs, ys, ps, ts = xs[order], ys[order], ps[order], ts[order]
    k = frame_index(ts, time_steps, split_by)
    flat = ((k * 2 + ps) * height + ys) * width + xs
    counts = np.bincount(flat, minlength=time_steps * 2 * height * width)
    return torch.from_numpy(counts.astype(np.float32).reshape(time_steps, 2, height, width))


# ------------------------------------------------------------------------------------------------ parsers
def decode_nmnist(data: bytes, source: str = "<bytes>") -> Events:
    """Decode an N-MNIST ``.bin`` recording (format in the module docstring); errors name ``source``."""
    if len(data) == 0:
        raise FileFormatError(f"N-MNIST file {source} is empty (expected 5 bytes per event)")
    if len(data) % 5:
        raise FileFormatError(f"N-MNIST file {source} is truncated or not an N-MNIST recording: {len(data)} "
                              "bytes is not a multiple of 5 (5 bytes per event)")
    ev = np.frombuffer(data, dtype=np.uint8).reshape(-1, 5).astype(np.int64)
    x, y, p = ev[:, 0], ev[:, 1], ev[:, 2] >> 7
    t = ((ev[:, 2] & 0x7F) << 16) | (ev[:, 3] << 8) | ev[:, 4]
    overflow = y == _NMNIST_OVERFLOW_Y
    if overflow.any():
        t = t + _NMNIST_OVERFLOW_US * np.cumsum(overflow)
        keep = ~overflow
        x, y, p, t = x[keep], y[keep], p[keep], t[keep]
    if x.size == 0:
        raise FileFormatError(f"N-MNIST file {source} holds no events (only timestamp-overflow markers)")
    bad = np.flatnonzero((x >= NMNIST_SIZE) | (y >= NMNIST_SIZE))
    if bad.size:
        i = int(bad[0])
        raise FileFormatError(f"N-MNIST file {source} is corrupt: event {i} is at x={int(x[i])}, y={int(y[i])}, "
                              f"outside the {NMNIST_SIZE}x{NMNIST_SIZE} sensor")
    return Events(x, y, p, t)


def decode_aedat(data: bytes, source: str = "<bytes>") -> Events:
    """Decode a CIFAR10-DVS AEDAT 2.0 recording (format in the module docstring); errors name ``source``."""
    magic = b"#!AER-DAT"
    if not data.startswith(magic):
        raise FileFormatError(f"{source} is not an AEDAT file: it does not start with the '#!AER-DAT' header "
                              "(CIFAR10-DVS recordings are AEDAT 2.0)")
    eol = data.find(b"\n")
    version = data[len(magic): eol if eol >= 0 else len(data)].strip().decode("ascii", "replace")
    if version != "2.0":
        raise FileFormatError(f"{source} is AEDAT version {version[:20]!r}; only AEDAT 2.0 (the CIFAR10-DVS "
                              "release format) is supported")
    pos = 0
    while pos < len(data) and data[pos] == ord("#"):
        eol = data.find(b"\n", pos)
        if eol < 0:
            raise FileFormatError(f"{source} is truncated: its header does not end (no events)")
        pos = eol + 1
    body = memoryview(data)[pos:]
    if len(body) == 0:
        raise FileFormatError(f"AEDAT file {source} holds no events")
    if len(body) % 8:
        raise FileFormatError(f"AEDAT file {source} is truncated: {len(body)} bytes of events is not a multiple "
                              "of 8 (int32 address + int32 timestamp per event)")
    words = np.frombuffer(body, dtype=">u4").reshape(-1, 2)
    addr, t = words[:, 0].astype(np.int64), words[:, 1].astype(np.int64)
    x_raw, y_raw = (addr >> 1) & 0x7F, (addr >> 8) & 0x7F
    return Events(DVS128_SIZE - 1 - y_raw, DVS128_SIZE - 1 - x_raw, 1 - (addr & 1), t)


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise FileFormatError(f"cannot read {what} {path}: {err.strerror or err}") from None


def read_nmnist(path: str | Path) -> Events:
    """Read one N-MNIST ``.bin`` file."""
    return decode_nmnist(_read(path, "N-MNIST file"), str(path))


def read_aedat(path: str | Path) -> Events:
    """Read one CIFAR10-DVS ``.aedat`` (AEDAT 2.0) file."""
    return decode_aedat(_read(path, "AEDAT file"), str(path))


# ----------------------------------------------------------------------------------------------- datasets
# ------------------------------------------------ tonic's structured arrays (see tonic_interop)
#: the dtype of tonic's event arrays for 2-polarity cameras (tonic.io.make_structured_array's default order)
TONIC_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])


def to_structured(events: Events) -> np.ndarray:
    """Our events as a tonic structured array (``x``, ``y``, ``t``, ``p``)."""
    out = np.empty(len(events.x), dtype=TONIC_DTYPE)
    for field in ("x", "y", "t", "p"):
        out[field] = getattr(events, field)
    return out


def from_structured(arr: Any, where: str = "events") -> Events:
    """A structured array with fields ``x``, ``y``, ``t``, ``p`` (tonic's) as :class:`Events`."""
    names = getattr(getattr(arr, "dtype", None), "names", None) or ()
    missing = [f for f in ("x", "y", "t", "p") if f not in names]
    if missing or getattr(arr, "ndim", 0) != 1:
        raise InputError(f"{where}: expected a 1-D structured event array with fields x, y, t, p (tonic's); "
                         f"missing {missing or 'nothing'}, shape {getattr(arr, 'shape', None)}")
    return Events(*(np.asarray(arr[f]).astype(np.int64) for f in ("x", "y", "p", "t")))


def frames_of(sample: Any, time_steps: int, height: int, width: int, split_by: str, where: str) -> Tensor:
    """A sample as frames ``[T, 2, H, W]`` float32: structured events are framed by :func:`events_to_frames`;
    an array of frames ``[T, P, H, W]`` (a tonic ``ToFrame`` output) is taken as it is, checked."""
    if getattr(getattr(sample, "dtype", None), "names", None):
        ev = from_structured(sample, where)
        return events_to_frames(ev.x, ev.y, ev.p, ev.t, time_steps, height, width, split_by)
    frames = torch.as_tensor(np.asarray(sample)).to(torch.float32)
    if frames.dim() != 4 or tuple(frames.shape[1:]) != (2, height, width) or not bool(torch.isfinite(frames).all()):
        raise InputError(f"{where}: a transform returned {tuple(frames.shape)}; expected structured events or "
                         f"finite frames [T, 2, {height}, {width}]")
    return frames


class EventFileDataset(Dataset):
    """Recordings read and binned on access: item ``i`` is ``(frames [T, 2, H, W] float32, label)``."""

    def __init__(self, tree: FileTree, names: Sequence[str], labels: np.ndarray,
                 decoder: Callable[[bytes, str], Events], size: int, time_steps: int, split_by: str,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.tree, self.names, self.labels = tree, list(names), np.asarray(labels)
        self.decoder, self.size, self.time_steps, self.split_by = decoder, size, time_steps, split_by
        self.transform = transform  # a tonic transform: it receives each recording as a structured array

    def __len__(self) -> int:
        return len(self.names)

    def events(self, i: int) -> Events:
        """The raw events of item ``i``."""
        return self.decoder(self.tree.read(self.names[i]), self.tree.describe(self.names[i]))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        ev = self.events(i)
        if self.transform is not None:
            sample = self.transform(to_structured(ev))
            return frames_of(sample, self.time_steps, self.size, self.size, self.split_by,
                             self.tree.describe(self.names[i])), int(self.labels[i])
        frames = events_to_frames(ev.x, ev.y, ev.p, ev.t, self.time_steps, self.size, self.size, self.split_by)
        return frames, int(self.labels[i])


def _event_bundle(name: str, tree: FileTree, names: list[str], labels: np.ndarray, train_pool: np.ndarray,
                  test_pool: np.ndarray | None, class_names: list[str], decoder: Callable[[bytes, str], Events],
                  size: int, opts: BuildOptions) -> DatasetBundle:
    plan = plan_splits(labels, train_pool, test_pool, val_fraction=opts.val_fraction, seed=opts.seed,
                       limit=opts.limit, max_per_class=opts.max_per_class, class_names=class_names)

    def make(idx: np.ndarray | None) -> Dataset | None:
        if idx is None:
            return None
        return EventFileDataset(tree, [names[i] for i in idx], labels[idx], decoder, size, opts.time_steps,
                                opts.split_by, opts.event_transform)

    return DatasetBundle(name, make(plan.train), make(plan.val), make(plan.test),  # type: ignore[arg-type]
                         len(class_names), 2, size, True, class_names, EVENT_MEAN, EVENT_STD, source=tree.label)


_NMNIST_EXPECTED = "Train/<digit>/*.bin and Test/<digit>/*.bin (the N-MNIST release), as a folder or a .tar.gz"


def _build_nmnist(root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """N-MNIST's published Train / Test split; validation carved from Train. The Test folder is optional."""
    assert root is not None
    tree, prefix = locate(root, lambda files: find_class_folders(files, ("train",), (".bin",)), "N-MNIST data",
                          _NMNIST_EXPECTED)
    files, digits = tree.entries(), [str(i) for i in range(10)]  # empty class folders included
    train = check_class_folders(list_class_folders(files, prefix, "train", (".bin",)),
                                tree.describe(prefix + "Train"), num_classes=10, class_names=digits, kind=".bin")
    names, labels = flatten_folders(train, digits)
    n_train = len(names)
    test = list_class_folders(files, prefix, "test", (".bin",))
    test_pool = None
    if test is not None:
        test = check_class_folders(test, tree.describe(prefix + "Test"), class_names=digits, kind=".bin")
        more, more_labels = flatten_folders(test, digits)
        names, labels = names + more, np.concatenate([labels, more_labels])
        test_pool = np.arange(n_train, len(names))
    return _event_bundle("nmnist", tree, names, labels, np.arange(n_train), test_pool, digits, decode_nmnist,
                         NMNIST_SIZE, opts)


_DVS_EXPECTED = "10 class folders <class>/*.aedat (the CIFAR10-DVS release, unzipped), as a folder or a .tar.gz"
#: share of each class's recordings (in sorted file order) in the training split, as the reference
DVS_TRAIN_RATIO = 0.9


def _build_cifar10dvs(root: Path | None, opts: BuildOptions) -> DatasetBundle:
    """CIFAR10-DVS has no published split: per class, the first ``ceil(0.9 n)`` recordings in sorted file
    order train and the rest test (the reference's ``split_to_train_test_set(0.9, ...)`` over a folder
    dataset); the validation split is then carved from the training part."""
    assert root is not None
    tree, prefix = locate(root, lambda files: find_class_folders(files, None, (".aedat",)), "CIFAR10-DVS data",
                          _DVS_EXPECTED)
    folders = check_class_folders(list_class_folders(tree.entries(), prefix, None, (".aedat",)),
                                  tree.describe(prefix.rstrip("/") or "."), num_classes=10, kind=".aedat")
    class_names = list(folders)
    names, labels = flatten_folders(folders, class_names)
    train_pool, test_pool, start = [], [], 0
    for files in folders.values():
        cut = math.ceil(len(files) * DVS_TRAIN_RATIO)
        train_pool += range(start, start + cut)
        test_pool += range(start + cut, start + len(files))
        start += len(files)
    return _event_bundle("cifar10dvs", tree, names, labels, np.array(train_pool, dtype=np.int64),
                         np.array(test_pool, dtype=np.int64), class_names, decode_aedat, DVS128_SIZE, opts)


register_dataset("nmnist", _build_nmnist, "N-MNIST: " + _NMNIST_EXPECTED, events=True)
register_dataset("cifar10dvs", _build_cifar10dvs, "CIFAR10-DVS: " + _DVS_EXPECTED, events=True)
