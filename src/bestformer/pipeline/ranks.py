"""What the processes of a job agree on (rank 0 decides, reads or locks; the others follow): the process group of
a job, the run folder's lock, whether it holds a checkpoint, and models that rank 0 reads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import BestformerError, ConfigError
from ..models import create_model
from ..training.config import TrainConfig
from ..training.dist import DistContext, broadcast_module, broadcast_object, distributed, timeout_from_env
from ..training.runs import RunFolder
from .weights import load_weights_spec


def load_on_main(ctx: DistContext, load: Callable[[], Any]) -> Any:
    """``load()`` on rank 0; its failure is raised on every rank (the others would otherwise wait for rank 0's
    broadcast until the collective timeout). Returns rank 0's result (``None`` elsewhere)."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = load()
        except BestformerError as err:
            error = err
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(f"rank 0 failed: {message}")
    return result


def shared_checkpoint(path: str | Path, ctx: DistContext) -> nn.Module:
    """A model checkpoint (or zoo entry) that rank 0 reads; the other ranks build the same architecture and receive
    its weights (so the file need only be on rank 0's file system, and no rank reads it before rank 0 finished
    writing)."""
    loaded = load_on_main(ctx, lambda: load_weights_spec(path))
    name, args = broadcast_object((loaded[1]["model_name"], loaded[1]["model_args"]) if ctx.is_main else None)
    model = loaded[0] if ctx.is_main else create_model(name, **args)
    return broadcast_module(model)


def agreed_checkpoint(folder: RunFolder) -> bool:
    """Whether ``folder`` holds a resume state, as rank 0 sees it; every rank must see the same (they all read it)."""
    here = folder.has_checkpoint()
    there = broadcast_object(here)
    if here != there:
        raise ConfigError(f"rank 0 {'finds' if there else 'does not find'} a checkpoint in {folder.path} but this "
                          "rank does not agree: every node must see the run folder (put --out on a shared file "
                          "system)")
    return here


def session(cfg: TrainConfig, ctx: DistContext | None) -> contextlib.AbstractContextManager[DistContext]:
    """The given context, else the process group of torchrun's environment (joined now, left at the end and on
    error; backend failures become :class:`~bestformer.training.dist.DistributedError`), else a single process."""
    if ctx is not None:
        return contextlib.nullcontext(ctx)
    return distributed(cfg.device, timeout_from_env())


@contextlib.contextmanager
def locked(folder: RunFolder, ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds the run folder's lock; its refusal is raised on every rank."""
    with contextlib.ExitStack() as stack:
        load_on_main(ctx, lambda: stack.enter_context(folder.lock()))
        yield
