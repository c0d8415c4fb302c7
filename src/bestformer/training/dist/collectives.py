"""Collectives and rank-0 helpers that work the same with or without a process group: rank and world size,
rank-0-only printing and progress bars, barriers, broadcasts and all-reduced metric sums."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ...progress import progress_bar

T = TypeVar("T")


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


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place (same shapes on every rank; no-op in a single process).
    A tensor off the collective's device is sent through a copy on it: NCCL carries CUDA tensors only, and a model
    read from disk is still on the CPU."""
    if get_world_size() == 1:
        return
    device = _collective_device()
    with torch.no_grad():
        for tensor in tensors:
            if tensor.device == device:
                dist.broadcast(tensor.data, src=src)
            else:
                staged = tensor.data.to(device)
                dist.broadcast(staged, src=src)
                tensor.data.copy_(staged)


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s (same architecture on every rank;
    no-op in a single process). Used for weights that only rank 0 read from disk."""
    broadcast_tensors(list(module.parameters()) + list(module.buffers()), src)
    return module
