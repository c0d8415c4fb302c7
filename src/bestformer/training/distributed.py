"""Scale-out training on ``torch.distributed``: torchrun process groups, sharded sampling, DDP, rank-0 helpers.

Nothing here is from the papers (BESTformer trained on 4 GPUs with timm's script; the paper says no more); it is
our design on top of PyTorch's own engine (``torchrun``, ``init_process_group``, ``DistributedDataParallel``):

- :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``), picks NCCL on CUDA and gloo on CPU and sets a collective timeout, so that a stalled peer
  fails the others after ``timeout_s`` instead of hanging; :func:`collective_errors` turns the backend's failure
  into one :class:`DistributedError` line. (A dead peer fails gloo at once with "connection closed by peer";
  NCCL's watchdog, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` by default, tears the process down at the timeout;
  under torchrun the agent also stops every worker as soon as one exits with an error.)
- :class:`ShardedBatchSampler` shards any map-style dataset (images or event frames: only ``len`` is used) so that
  every sample is seen exactly once per epoch across ranks, with no padding by duplicates. A global batch
  ``G = batch_size x accum_steps x world_size`` is cut into ``S = G / batch_size`` *slots*, one micro-batch each;
  the cut does not depend on how the slots are spread over processes, so runs with the same ``G`` and
  ``batch_size`` see identical micro-batches (hence identical BatchNorm batch statistics and gradients) on any
  world size. Each micro-batch carries its loss weight ``count x world_size / step_count``: with DDP's gradient
  average this gives the mean over the step's real samples, also for the uneven last step.
- DDP wrapping (:func:`wrap_ddp`; optional synced BatchNorm: torch's SyncBatchNorm on CUDA, our
  :class:`DistributedBatchNorm` on CPU, exact in forward and backward), gradient accumulation
  (:func:`gradient_sync`), a frozen distillation teacher shared by all ranks (:func:`prepare_teacher`,
  :func:`broadcast_module`), rank-0-only printing, progress bars and writing, all-reduced metrics, resume from
  ``samples_seen`` on another world size with the same global batch (:func:`replan_batches`,
  :func:`position_from_samples`) and the ``--nproc`` launcher (:func:`launch_torchrun`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from tqdm import tqdm

from ..errors import BestformerError, ConfigError, InputError
from ..progress import progress_bar

#: Variables torchrun sets for every worker (MASTER_* are those of the rendezvous host).
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective may wait for a peer before failing (torch's own default is 10 min for NCCL, 30 for gloo).
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class DistributedError(BestformerError):
    """A distributed run lost a peer: another process crashed, stalled past the timeout, or was unreachable."""


# ----------------------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a run: ``rank`` of ``world_size``, its node-local rank and device.

    ``backend`` is ``"nccl"`` / ``"gloo"`` when a process group is up, ``None`` for a single-process run.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun (or any launcher that sets ``WORLD_SIZE``/``RANK``)."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env or "RANK" in env


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise ConfigError(f"{name} is not set although RANK/WORLD_SIZE are: start the run with torchrun, "
                          f"which sets {', '.join(LAUNCH_ENV)}")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


def read_launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or ``None`` outside a launcher."""
    env = os.environ if env is None else env
    if not launched_by_torchrun(env):
        return None
    rank, world, local = (_env_int(env, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world < 1 or rank >= world:
        raise ConfigError(f"RANK={rank} must be below WORLD_SIZE={world} (and WORLD_SIZE >= 1)")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise ConfigError(f"{key} is not set: start the run with torchrun, which sets {', '.join(LAUNCH_ENV)}")
    return rank, world, local


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (0 outside one); valid before the group is joined and
    after it is left (e.g. to print a run's results on rank 0 only)."""
    env = os.environ if env is None else env
    return int(env.get("RANK", "0")) if str(env.get("RANK", "0")).isdigit() else 0


def timeout_from_env(env: Mapping[str, str] | None = None) -> float:
    """The collective timeout in seconds: ``BESTFORMER_DIST_TIMEOUT`` when set, else :data:`DEFAULT_TIMEOUT_S`."""
    env = os.environ if env is None else env
    raw = env.get("BESTFORMER_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"BESTFORMER_DIST_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


def resolve_device(device: str | torch.device, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; a distributed process uses ``cuda:LOCAL_RANK``."""
    spec = str(device)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; expected 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device {spec!r} is not supported for training; expected 'auto', 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine; use 'cpu'")
    if not distributed:
        return dev
    if dev.index is not None:
        raise ConfigError(f"under torchrun every process uses cuda:LOCAL_RANK; pass 'cuda', not {spec!r}")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible on this node; "
                          f"use --nproc_per_node <= {count}")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     backend: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment; outside torchrun return a single-process
    context (no group). The backend follows the device: NCCL for CUDA, gloo for CPU (``backend`` overrides).

    ``timeout_s`` bounds every collective: a rank that stops answering makes the others raise (gloo) or be torn
    down by the NCCL watchdog after that long, instead of waiting forever.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"distributed timeout must be a number of seconds > 0, got {timeout_s!r}")
    launch = read_launch_env()
    if launch is None:
        return DistContext(device=resolve_device(device), timeout_s=float(timeout_s))
    rank, world, local = launch
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; install a build with distributed support")
    dev = resolve_device(device, local, distributed=True)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        ctx = DistContext(rank, world, local, dev, backend, float(timeout_s))
        with collective_errors(ctx):
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, dev, dist.get_backend(), float(timeout_s))


def destroy_distributed() -> None:
    """Leave the process group (no-op when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str | torch.device = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                backend: str | None = None) -> Iterator[DistContext]:
    """``with distributed() as ctx:`` joins the group, turns peer failures into :class:`DistributedError`
    and always leaves the group."""
    ctx = init_distributed(device, timeout_s, backend)
    try:
        with collective_errors(ctx):
            yield ctx
    finally:
        destroy_distributed()


# gloo reports a lost or late peer as a plain RuntimeError ("[.../gloo/transport/tcp/pair.cc:553] Connection
# closed by peer ...", "Timed out waiting 5000ms for recv ..."); NCCL and the TCP store raise DistError.
_COMM_FAILURE = re.compile(r"/gloo/|connection (closed|reset) by peer|timed out waiting|monitoredBarrier",
                           re.IGNORECASE)
_SOURCE_PREFIX = re.compile(r"^(\s*\[[^\]]*\]:?)+\s*")  # "[.../pair.cc:553] " or "[Rank 0]: "


def is_comm_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from the communication backend (as opposed to a bug or bad input)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and bool(_COMM_FAILURE.search(str(err)))


def _first_sentence(err: BaseException) -> str:
    line = _SOURCE_PREFIX.sub("", str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    return line.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def collective_errors(ctx: DistContext) -> Iterator[None]:
    """Re-raise a backend failure inside the block as one :class:`DistributedError` line naming this rank,
    the likely cause and the timeout; other exceptions pass through unchanged."""
    try:
        yield
    except RuntimeError as err:
        if not ctx.is_distributed or isinstance(err, BestformerError) or not is_comm_failure(err):
            raise
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size} lost contact with the other processes ({_first_sentence(err)}); "
            f"another rank probably crashed (its log says why) or stalled longer than the {ctx.timeout_s:g} s "
            "timeout"
        ) from err


# ----------------------------------------------------------------------------------------- rank-0 helpers
def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 of the run (always true in a single-process run): the one that logs, shows progress, writes."""
    return get_rank() == 0


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorate ``fn`` to run on rank 0 only (returns ``None`` elsewhere): printing, logging, file writing."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


print_main = rank_zero_only(print)


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar shown by rank 0 only (other ranks get a disabled one, so loops stay the same)."""
    kwargs["disable"] = bool(kwargs.get("disable")) or not is_main_process()
    return progress_bar(iterable, **kwargs)


def barrier(timeout_s: float | None = None) -> None:
    """Wait for every rank. On gloo the monitored barrier names the ranks that did not arrive in time."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == "gloo" and timeout_s is not None:
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(local: bool = True) -> Iterator[None]:
    """Let rank 0 (of each node with ``local=True``) run the block first, e.g. to decode a dataset into the
    cache, while the others wait and then find the cache filled."""
    leader = (int(os.environ.get("LOCAL_RANK", "0")) if local else get_rank()) == 0
    if not leader:
        barrier()
    yield
    if leader:
        barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (e.g. a run directory named after rank 0's clock)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: Mapping[str, float]) -> dict[str, float]:
    """Sum each metric over ranks (one float64 all-reduce). Reduce *sums* and counts, divide afterwards:
    ``{"loss_sum": ..., "correct": ..., "count": ...}`` gives exact global means for uneven shards."""
    keys = sorted(values)
    if get_world_size() == 1:
        return {k: float(values[k]) for k in keys}
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(buf)
    return dict(zip(keys, buf.tolist()))


# ------------------------------------------------------------------------------------------------ batching
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
        loss_weight: multiply the micro-batch's *mean* loss by it before ``backward``: ``count x world_size /
            step_count``. DDP averages gradients over ranks, so the result is the mean over the step's samples.
    """

    indices: tuple[int, ...]
    count: int
    step: int
    step_count: int
    last: bool
    loss_weight: float


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
                                 count * self.world_size / m)

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


# ----------------------------------------------------------------------------------------------- models
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: ``y = sum_r x_r`` on every rank; the gradient of rank ``r``'s input is the
    sum over ranks of ``dL_r'/dy`` (the all-reduce is its own adjoint)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span the current micro-batch of every rank (our CPU SyncBatchNorm).

    Forward (train mode): each rank sums its inputs per channel in float64; one differentiable all-reduce gives
    the global sum and count, hence the mean; a second one the global sum of squared deviations, hence the biased
    variance (two passes in float64: no ``E[x^2] - E[x]^2`` cancellation, at the cost of a float64 copy of the
    input). The output is ``(x - mean) / sqrt(var + eps) * weight + bias`` and the running statistics are
    updated as by :class:`torch.nn.BatchNorm2d` (unbiased variance ``var n / (n - 1)``, ``momentum``, or the
    cumulative average when it is ``None``). Because the all-reduces are differentiable, the backward pass carries
    every rank's gradient through the shared statistics: forward *and* gradients equal those of one BatchNorm over
    the concatenated micro-batches (up to float rounding), which is what makes a W-process run equal a
    single-process run with W times the batch. Eval mode and a run without process group use the running
    statistics / the plain per-batch path of ``F.batch_norm``.

    Why not ``nn.SyncBatchNorm``: torch implements it for CUDA only (it is used there, see :func:`wrap_ddp`).
    Channels: dimension 1 of any input of 2 or more dimensions (BatchNorm1d ``[M, C]`` / ``[B, C, L]`` and
    BatchNorm2d ``[B, C, H, W]``, channels-last included).
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise InputError(f"DistributedBatchNorm expects an input [batch, channels, ...], got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or not (dist.is_available() and dist.is_initialized()) or get_world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_n = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims, dtype=torch.float64), local_n]))
        n = total[-1].detach()
        mean = total[:-1] / n
        sq = _AllReduceSum.apply(((x.double() - mean.view(shape)) ** 2).sum(dims))
        var = sq / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d) in ``module`` by a :class:`DistributedBatchNorm` holding the same
    parameter and buffer objects (so an optimizer built before still applies; in place for sub-modules; returns the
    converted module)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        new = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        return new.train(module.training)
    for name, child in module.named_children():
        converted = convert_distributed_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def wrap_ddp(model: nn.Module, ctx: DistContext, sync_bn: bool = False,
             find_unused_parameters: bool = False) -> nn.Module:
    """Move ``model`` to the context's device and wrap it in DistributedDataParallel (unchanged in a
    single-process run). DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
    from the same weights.

    ``sync_bn``: BatchNorm statistics over the micro-batches of all ranks, as one global batch:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`DistributedBatchNorm` on CPU (the model's BatchNorm layers are
    replaced in place). Without it each rank normalizes with its own micro-batch's statistics, exactly as a
    single process accumulating the same micro-batches.
    """
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model
    if sync_bn:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_distributed_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (for evaluation, checkpoints and ``model_name``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: skip DDP's gradient all-reduce unless ``sync`` (the step's
    last micro-batch), so accumulation costs one all-reduce per optimizer step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s (same architecture on every rank;
    no-op in a single process). Used for weights that only rank 0 read from disk."""
    if get_world_size() > 1:
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=src)
    return module


def prepare_teacher(teacher: nn.Module, ctx: DistContext) -> nn.Module:
    """A frozen distillation teacher for this rank: on its device, eval mode, no gradients, with rank 0's weights
    (broadcast, so that all ranks distil from the same teacher). It is not wrapped in DDP (nothing to train):
    each rank runs it on its own micro-batches only. Eq. 15's teacher label ``argmax teacher(x)`` is per sample
    in eval mode, so the sharded targets equal those of a single process on the whole batch."""
    teacher = unwrap_model(teacher).to(ctx.device).eval().requires_grad_(False)
    return broadcast_module(teacher) if ctx.is_distributed else teacher


# ------------------------------------------------------------------------------------------------ launcher
def remove_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (what the launcher strips before relaunching)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, args: Sequence[str], module: str = "bestformer") -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m bestformer ARGS`` (as ``python -m torch.distributed.run``,
    so the current interpreter and environment are used)."""
    n = _positive_int("--nproc", nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", module, *args]


def launch_torchrun(nproc: int, args: Sequence[str], module: str = "bestformer") -> int:
    """Run ``args`` in ``nproc`` processes on this machine through torchrun's launcher (in this process; the
    workers are new processes); returns 0 when every worker succeeded. When one fails, the launcher stops the
    others and this raises one :class:`DistributedError` line naming the failed rank and its exit code (the
    worker's own error is printed above it) instead of the launcher's traceback."""
    if launched_by_torchrun():
        raise ConfigError("--nproc starts torchrun itself; inside a torchrun worker leave it out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(torchrun_command(nproc, args, module)[3:])
    try:
        run(launcher_args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exited with code {code}"
        raise DistributedError(f"worker rank {rank} of {nproc} {how}; torchrun stopped the other workers (the "
                               "failed worker's own error, if it printed one, is above)") from None
    return 0
