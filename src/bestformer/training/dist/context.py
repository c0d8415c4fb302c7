"""The process group of a torchrun run: reading the launcher's environment, joining and leaving the group, and
turning a lost peer into one :class:`DistributedError` line.

Our design on PyTorch's engine (``torchrun``, ``init_process_group``): :func:`init_distributed` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), picks NCCL on CUDA and
gloo on CPU and sets a collective timeout, so that a stalled peer fails the others after ``timeout_s`` instead of
hanging; :func:`collective_errors` turns the backend's failure into one :class:`DistributedError` line. (A dead
peer fails gloo at once with "connection closed by peer"; NCCL's watchdog, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``
by default, tears the process down at the timeout; under torchrun the agent also stops every worker as soon as one
exits with an error.)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ...errors import BestformerError, ConfigError

#: Variables torchrun sets for every worker (MASTER_* are those of the rendezvous host).
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective may wait for a peer before failing (torch's own default is 10 min for NCCL, 30 for gloo).
DEFAULT_TIMEOUT_S = 600.0


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


#: the DDP wrappers of this process, weakly held (see :func:`destroy_distributed`)
DDP_WRAPPERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def destroy_distributed() -> None:
    """Leave the process group (no-op when none is up).

    Every DDP wrapper of this process first lets go of its C++ reducer and logger, which hold the group. Else the
    reducer, freed later with the GIL held, can drop a gloo group's last reference: its destructor joins worker
    threads that need the GIL to free a failed collective's saved Python context, and the process never exits
    (seen after a peer crashed, torch 2.13). Freed here, the group's last reference goes with torch's Python handle,
    which lets go of the GIL meanwhile.
    """
    if dist.is_available() and dist.is_initialized():
        for wrapper in list(DDP_WRAPPERS):
            for name in ("logger", "reducer"):  # the logger holds the reducer
                wrapper.__dict__.pop(name, None)
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

