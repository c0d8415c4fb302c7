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

from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .events import TONIC_DTYPE, frames_of, from_structured, to_structured

__all__ = ["TONIC_DTYPE", "TonicDataset", "frames_of", "from_structured", "from_tonic", "to_structured"]

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

