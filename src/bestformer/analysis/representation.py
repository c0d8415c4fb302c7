"""Representation capability of encoder blocks (BESTformer Fig. 2 and Fig. 5b).

The paper measures representation capability by the *value-set size* of a feature map, "the maximum number of
distinct values in a feature map" (Section 3.2), and argues with its entropy (Propositions 1-2: entropy does not
grow with depth, and is invariant across the blocks of a reversible network). Both are measured here per
encoder block, from the block's output on real inputs:

- set size: the number of distinct values of one sample's output feature map (every step, token and channel),
  averaged over samples (the paper averages too; the maximum is reported beside it);
- entropy (our estimator, the paper gives none): the plug-in Shannon entropy, in bits, of the empirical
  distribution of those exact values, ``H = -sum_v p_v log2 p_v`` with ``p_v`` the fraction of entries equal
  to ``v``. It is 0 for a constant map and at most ``log2(set size)``; for a full-precision map, where nearly
  every entry is distinct, it approaches ``log2(numel)``.

A reversible block (Eq. 12) outputs two streams; the block's numbers are those of the pair (both streams of a
sample together, the state Proposition 2 is about), and each stream is reported as well.

The blocks are the children of ``model.blocks`` or the blocks of ``model.stages`` (timm's two conventions), or
the modules named in ``blocks=``. Outputs are time-first ``[T, B, ...]``; the sample axis is the one of size
``B`` (axis 1, or axis 0 for a ``[B, ...]`` output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class _Series:
    """Set size and entropy of each feature map of a series (one map per sample)."""

    set_sizes: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)

    def add(self, x: Tensor) -> None:
        _, counts = torch.unique(x.detach().flatten(), return_counts=True)
        p = counts.double() / counts.sum()
        self.set_sizes.append(int(counts.numel()))
        self.entropies.append(float(-(p * torch.log2(p)).sum()))

    def summary(self) -> dict[str, float]:
        n = len(self.set_sizes)
        mean_h = sum(self.entropies) / n
        return {
            "set_size": sum(self.set_sizes) / n,
            "set_size_max": max(self.set_sizes),
            "entropy_bits": mean_h,
            "entropy_std": math.sqrt(sum((h - mean_h) ** 2 for h in self.entropies) / n),
        }


def value_set_size(x: Tensor) -> int:
    """Number of distinct values in ``x``."""
    return int(torch.unique(x.detach().flatten()).numel())


def value_entropy(x: Tensor) -> float:
    """Plug-in Shannon entropy (bits) of the empirical distribution of the exact values in ``x``."""
    series = _Series()
    series.add(x)
    return series.entropies[0]


@dataclass
class BlockRepresentation:
    """Representation capability of one encoder block over the samples seen.

    Attributes: name; set_size (mean over samples) and set_size_max; entropy_bits (mean) and entropy_std;
    samples; streams (the same four numbers per output stream, one entry for a single-stream block).
    """

    name: str
    set_size: float
    set_size_max: int
    entropy_bits: float
    entropy_std: float
    samples: int
    streams: list[dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sample_axis(t: Tensor, batch: int) -> int:
    if t.dim() >= 2 and t.shape[1] == batch:
        return 1
    if t.shape[0] == batch:
        return 0
    raise ConfigError(f"cannot find the sample axis (size {batch}) of a block output of shape {tuple(t.shape)}")


def encoder_blocks(model: nn.Module, blocks: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The encoder blocks: ``blocks`` (module names), else the children of ``model.blocks``, else the blocks of
    every stage of ``model.stages`` (``stages[i].blocks`` or the stage's children), timm's two layouts."""
    modules = dict(model.named_modules())
    if blocks is not None:
        missing = [b for b in blocks if b not in modules]
        if missing:
            raise ConfigError(f"model has no module {missing[0]!r} to measure as an encoder block")
        return [(b, modules[b]) for b in blocks]
    container = getattr(model, "blocks", None)
    if isinstance(container, (nn.ModuleList, nn.Sequential)):
        return [(f"blocks.{i}", b) for i, b in enumerate(container)]
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.ModuleList, nn.Sequential)):
        found = []
        for i, stage in enumerate(stages):
            inner = getattr(stage, "blocks", stage)
            prefix = f"stages.{i}.blocks" if inner is not stage else f"stages.{i}"
            if isinstance(inner, (nn.ModuleList, nn.Sequential)):
                found += [(f"{prefix}.{j}", b) for j, b in enumerate(inner)]
            else:
                found.append((f"stages.{i}", stage))
        return found
    raise ConfigError(f"{type(model).__name__} has no `blocks` (or `stages`) list of encoder blocks (timm's "
                      "convention); name the blocks to measure with blocks=[...]")


class RepresentationProbe:
    """Forward hooks on the encoder blocks that measure every sample's block outputs; use as a context manager
    around forward passes, calling :meth:`set_batch` with each batch size first."""

    def __init__(self, model: nn.Module, blocks: list[str] | None = None) -> None:
        self.blocks = encoder_blocks(model, blocks)
        self._joint: dict[str, _Series] = {name: _Series() for name, _ in self.blocks}
        self._streams: dict[str, list[_Series]] = {}
        self._handles: list[Any] = []
        self._batch = 0

    def set_batch(self, batch_size: int) -> None:
        self._batch = batch_size

    def __enter__(self) -> RepresentationProbe:
        for name, block in self.blocks:
            self._handles.append(block.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outs = [o for o in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(o, Tensor)]
            joint = self._joint[name]
            # a single-stream block: the stream is the block output, measured once
            streams = self._streams.setdefault(name, [_Series() for _ in outs] if len(outs) > 1 else [joint])
            axes = [_sample_axis(o, self._batch) for o in outs]
            for i in range(self._batch):
                per_sample = [o.select(axis, i).flatten() for o, axis in zip(outs, axes)]
                if len(outs) > 1:
                    for series, x in zip(streams, per_sample):
                        series.add(x)
                joint.add(torch.cat(per_sample))

        return hook

    def results(self) -> list[BlockRepresentation]:
        out = []
        for name, _ in self.blocks:
            joint = self._joint[name]
            if not joint.set_sizes:
                continue
            s = joint.summary()
            out.append(BlockRepresentation(name, s["set_size"], int(s["set_size_max"]), s["entropy_bits"],
                                           s["entropy_std"], len(joint.set_sizes),
                                           [series.summary() for series in self._streams[name]]))
        return out
