"""Interoperability with tonic (Lenz et al., the event-camera data library; issue 23).

- :func:`to_structured` / :func:`from_structured`: our :class:`~.events.Events` and tonic's structured event arrays
  (fields ``x``, ``y``, ``t``, ``p``) into each other, checked.
- ``build_datasets("nmnist", ..., event_transform=T)`` and :class:`~.events.EventFileDataset` apply a tonic
  transform (any callable on a structured array) to every recording: one that returns events (``Denoise``,
  ``DropEvent``, ...) is framed by us afterwards; one that returns frames ``[T, P, H, W]`` (``ToFrame``) is used as
  the sample.
- :func:`from_tonic` turns a tonic dataset (``tonic.datasets.NMNIST(...)``) into a dataset of
  ``(frames [T, 2, H, W] float32, label)`` that the trainer takes.

Framing against tonic's ``ToFrame`` (``tests/test_tonic.py`` checks both on the shared N-MNIST recordings):

- by event count (our ``split_by="number"``, tonic's ``n_event_bins=T``): frames ``0..T-2`` are identical; tonic
  drops the last ``N mod T`` events, our last frame keeps them (as SpikingJelly's ``split_by='number'`` does).
- by time (our ``split_by="time"``, tonic's ``n_time_bins=T``): tonic's window is ``floor(span / T)`` whole
  microseconds, half-open, so events at or after ``t0 + T * floor(span / T)`` (at least the last one) are dropped;
  ours are ``T`` exact windows over the whole span, the last one closed. When ``T`` divides the span the windows
  coincide and the only difference is those last events, in our last frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .events import Events, events_to_frames

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


class TonicDataset(Dataset):
    """A tonic dataset seen as ``(frames [T, 2, H, W] float32, label)`` items (see :func:`from_tonic`)."""

    def __init__(self, dataset: Any, time_steps: int, split_by: str, height: int, width: int) -> None:
        self.dataset, self.time_steps, self.split_by = dataset, time_steps, split_by
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        sample, target = self.dataset[i]
        frames = frames_of(sample, self.time_steps, self.height, self.width, self.split_by,
                           f"{type(self.dataset).__name__}[{i}]")
        return frames, int(target)


def from_tonic(dataset: Any, time_steps: int = 4, split_by: str = "number",
               sensor_size: tuple[int, int, int] | None = None) -> TonicDataset:
    """A tonic dataset (``tonic.datasets.NMNIST(save_to, train=True)``, its own ``transform`` included) as a
    bestformer dataset. ``sensor_size`` is tonic's ``(width, height, polarities)`` (default: the dataset's)."""
    size = sensor_size or getattr(dataset, "sensor_size", None)
    if size is None or len(size) != 3 or int(size[2]) != 2:
        raise InputError(f"from_tonic: need a 2-polarity sensor_size (width, height, 2), got {size!r}")
    return TonicDataset(dataset, time_steps, split_by, height=int(size[1]), width=int(size[0]))

