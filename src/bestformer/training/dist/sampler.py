"""Sharded sampling: how a global batch is cut into micro-batches over processes and accumulation steps.

:class:`ShardedBatchSampler` shards any map-style dataset (images or event frames: only ``len`` is used) so that
every sample is seen exactly once per epoch across ranks, with no padding by duplicates. A global batch
``G = batch_size x accum_steps x world_size`` is cut into ``S = G / batch_size`` *slots*, one micro-batch each;
the cut does not depend on how the slots are spread over processes, so runs with the same ``G`` and
``batch_size`` see identical micro-batches (hence identical BatchNorm batch statistics and gradients) on any
world size. Each micro-batch carries its loss weight ``count x world_size / step_count``: with DDP's gradient
average this gives the mean over the step's real samples, also for the uneven last step. A run resumes from
``samples_seen`` on another world size with the same global batch (:func:`replan_batches`,
:func:`position_from_samples`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from ...errors import ConfigError, InputError
from .context import DistContext


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is formed: ``global_batch = batch_size x accum_steps x world_size``."""

    global_batch: int
    batch_size: int
    accum_steps: int
    world_size: int

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step over all ranks (``global_batch / batch_size``)."""
        return self.accum_steps * self.world_size


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def plan_batches(global_batch: int, world_size: int, batch_size: int | None = None,
                 accum_steps: int | None = None) -> BatchPlan:
    """Split ``global_batch`` over ``world_size`` processes. Give the per-process ``batch_size`` (the
    accumulation follows, the usual choice when resuming on fewer devices: it keeps the micro-batches, hence the
    BatchNorm statistics, identical), or ``accum_steps`` (the batch size follows), or neither (no accumulation)."""
    g, w = _positive_int("global batch", global_batch), _positive_int("world size", world_size)
    if batch_size is not None and accum_steps is not None:
        b, a = _positive_int("batch size", batch_size), _positive_int("accumulation steps", accum_steps)
        if b * a * w != g:
            raise ConfigError(f"batch_size x accum_steps x world_size = {b} x {a} x {w} = {b * a * w}, "
                              f"not the global batch {g}")
        return BatchPlan(g, b, a, w)
    if g % w:
        raise ConfigError(f"global batch {g} cannot be split evenly over {w} processes; use a number of "
                          f"processes that divides {g}")
    per_rank = g // w
    if batch_size is not None:
        b = _positive_int("batch size", batch_size)
        if per_rank % b:
            divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            raise ConfigError(f"global batch {g} over {w} processes is {per_rank} per process, not a multiple of "
                              f"batch size {b}; choose a batch size among {divisors}")
        return BatchPlan(g, b, per_rank // b, w)
    a = 1 if accum_steps is None else _positive_int("accumulation steps", accum_steps)
    if per_rank % a:
        raise ConfigError(f"global batch {g} over {w} processes is {per_rank} per process, not divisible into "
                          f"{a} accumulation steps")
    return BatchPlan(g, per_rank // a, a, w)


def replan_batches(global_batch: int, world_size: int, batch_size: int) -> BatchPlan:
    """The layout of a run resumed on ``world_size`` processes: the same ``global_batch`` (it fixes the steps, the
    schedule and the resume position), micro-batches of ``batch_size`` when they divide a process's share (the
    accumulation follows; the micro-batches, hence BatchNorm's batch statistics, stay those of the original run),
    else the fewest accumulation steps whose micro-batches are no larger than ``batch_size`` (memory stays
    bounded; per-process BatchNorm statistics then change, synced BatchNorm keeps them when the micro-batches of
    all ranks still form the same groups). A global batch that the processes cannot share evenly is refused."""
    g, w, b = (_positive_int(k, v) for k, v in (("global batch", global_batch), ("world size", world_size),
                                                 ("batch size", batch_size)))
    if g % w:
        fits = [d for d in range(1, g + 1) if g % d == 0]
        raise ConfigError(f"the run's global batch {g} cannot be split evenly over {w} processes, and changing "
                          f"it would change the run; resume on a number of processes among {fits}")
    per_rank = g // w
    if per_rank % b == 0:
        return BatchPlan(g, b, per_rank // b, w)
    a = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= b)
    return BatchPlan(g, per_rank // a, a, w)


def position_from_samples(samples_seen: int, num_samples: int, global_batch: int) -> tuple[int, int]:
    """``(epoch, step)`` at which a run that has consumed ``samples_seen`` samples continues.

    Steps of an epoch cover positions ``[i G, (i + 1) G)`` of that epoch's order, whatever the world size, so
    the position is exact on any number of processes as long as the global batch ``G`` is the same.
    """
    n, g = _positive_int("dataset length", num_samples), _positive_int("global batch", global_batch)
    if isinstance(samples_seen, bool) or not isinstance(samples_seen, (int, np.integer)) or samples_seen < 0:
        raise ConfigError(f"samples seen must be an integer >= 0, got {samples_seen!r}")
    epoch, done = divmod(int(samples_seen), n)
    if done % g:
        raise ConfigError(f"the run stopped after {done} samples of epoch {epoch}, which is not a step boundary "
                          f"of global batch {g}: resume with the global batch it was trained with")
    return epoch, done // g


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward of one rank.

    Attributes:
        indices: dataset indices to load (a single filler index when ``count == 0``).
        count: real samples in it (0: a filler that only keeps the ranks in step; its loss weight is 0).
        step: optimizer step within the epoch; step_count: real samples of that step over all ranks.
        last: the last micro-batch of the step on this rank (synchronize gradients, then step the optimizer).
        slot: its place among the step's ``accum_steps x world_size`` micro-batches (``j x world_size + rank``):
            the same samples and augmentation draws on any layout of the same global and micro-batch size.
        loss_weight: multiply the micro-batch's *mean* loss by it before ``backward``: ``count x world_size /
            step_count``. DDP averages gradients over ranks, so the result is the mean over the step's samples.
    """

    indices: tuple[int, ...]
    count: int
    step: int
    step_count: int
    last: bool
    loss_weight: float
    slot: int = 0


def _sized_length(data: Sized | int, what: str = "dataset") -> int:
    if isinstance(data, (int, np.integer)) and not isinstance(data, bool):
        n = int(data)
    else:
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise InputError(f"distributed sharding needs a map-style {what} with len(), got "
                             f"{type(data).__name__}") from None
    if n < 1:
        raise InputError(f"cannot shard an empty {what}")
    return n


class ShardedBatchSampler(Sampler[list[int]]):
    """Batch sampler for a ``DataLoader(dataset, batch_sampler=...)`` on each rank: every sample exactly once
    per epoch across ranks, no padding, the same shuffled order on every rank (seeded by ``(seed, epoch)``).

    Step ``i`` of an epoch takes positions ``[i G, (i + 1) G)`` of the epoch's order (the last step may be
    shorter) and cuts them into ``S = accum_steps x world_size`` slots of ``batch_size`` (an uneven last step:
    sizes differing by at most one). Slot ``j x world_size + rank`` is micro-batch ``j`` of ``rank``. When a last
    step has fewer samples than slots, the empty slots get a filler sample with loss weight 0: every rank then
    runs the same number of forward/backward passes, which DDP and SyncBatchNorm require. (The filler's forward
    updates that rank's BatchNorm running statistics once; gradients are exact.)

    Call :meth:`set_epoch` before each epoch; :meth:`micro_batches` gives the plan (indices, counts, loss
    weights) in the order the loader yields the batches.
    """

    def __init__(self, data: Sized | int, batch_size: int, accum_steps: int = 1, world_size: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        self.num_samples = _sized_length(data)
        self.batch_size = _positive_int("batch size", batch_size)
        self.accum_steps = _positive_int("accumulation steps", accum_steps)
        self.world_size = _positive_int("world size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ConfigError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.rank, self.shuffle, self.seed = rank, bool(shuffle), int(seed)
        self.epoch, self.start_step = 0, 0

    @classmethod
    def for_context(cls, data: Sized | int, plan: BatchPlan, ctx: DistContext, shuffle: bool = True,
                    seed: int = 0) -> ShardedBatchSampler:
        """The sampler of this process for a :class:`BatchPlan`."""
        if plan.world_size != ctx.world_size:
            raise ConfigError(f"batch plan is for {plan.world_size} processes but the run has {ctx.world_size}")
        return cls(data, plan.batch_size, plan.accum_steps, ctx.world_size, ctx.rank, shuffle, seed)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; ``start_step`` skips the steps already done (resume mid-epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ConfigError(f"start step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, int(start_step)

    def resume(self, samples_seen: int) -> int:
        """Position the sampler after ``samples_seen`` samples (any world size); returns the epoch."""
        epoch, step = position_from_samples(samples_seen, self.num_samples, self.global_batch)
        self.set_epoch(epoch, step)
        return epoch

    def order(self) -> np.ndarray:
        """The epoch's order of dataset indices, identical on every rank."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        # independent stream per (seed, epoch): no overlap between e.g. (seed 0, epoch 1) and (seed 1, epoch 0)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

    def micro_batches(self) -> Iterator[MicroBatch]:
        """This rank's micro-batches of the epoch, from ``start_step`` on."""
        order, g, s = self.order(), self.global_batch, self.accum_steps * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * g:(step + 1) * g]
            m = len(chunk)
            sizes = np.full(s, m // s)
            sizes[: m % s] += 1
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            for j in range(self.accum_steps):
                slot = j * self.world_size + self.rank
                count = int(sizes[slot])
                idx = chunk[bounds[slot]:bounds[slot + 1]] if count else chunk[:1]
                yield MicroBatch(tuple(int(i) for i in idx), count, step, m, j == self.accum_steps - 1,
                                 count * self.world_size / m, slot)

    def __iter__(self) -> Iterator[list[int]]:
        for mb in self.micro_batches():
            yield list(mb.indices)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps


class ShardedSampler(Sampler[int]):
    """Evaluation sharding: rank ``r`` gets the ``r``-th contiguous block of ``range(len(data))`` (block sizes
    differ by at most one, no padding), so the ranks' results concatenated in rank order are in dataset order.
    Reduce metric sums and counts with :func:`all_reduce_sums`."""

    def __init__(self, data: Sized | int, world_size: int = 1, rank: int = 0) -> None:
        n = _sized_length(data)
        w = _positive_int("world size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < w:
            raise ConfigError(f"rank must be an integer in [0, {w}), got {rank!r}")
        self.start, self.stop = n * rank // w, n * (rank + 1) // w

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
