"""Evaluation of a model on a dataset (:func:`evaluate`), mixed precision, and the rank-0 log line.

Shared by the trainer (validation every epoch), the job runner (the final test) and ``bestformer eval``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import batched, collate, time_first
from ..errors import InputError
from ..hardware import cpu_info
from ..layers.modes import eval_mode
from .dist import DistContext, ShardedSampler, all_reduce_sums, progress, unwrap_model
from .distill import split_outputs


def log_main(ctx: DistContext, msg: str, err: bool = False) -> None:
    """Print ``msg`` on rank 0 only (through tqdm, so that a progress bar is not torn); ``err``: on stderr."""
    if ctx.is_main:
        tqdm.write(msg, file=sys.stderr if err else sys.stdout)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AVX512-BF16 or AMX-BF16; Linux flags)."""
    return not cpu_info().flags.isdisjoint({"avx512_bf16", "amx_bf16"})


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` option: ``"auto"`` is bf16 on CUDA and off elsewhere; ``"fast"`` is bf16 on
    CUDA and on CPUs with native bf16 products (where it is ~1.3-1.5x faster), off elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fast":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_labels(y: Tensor, num_classes: int, where: str) -> None:
    """Labels must be class indices in ``[0, num_classes)``."""
    if y.dtype.is_floating_point or y.dim() != 1:
        raise InputError(f"{where}: labels must be a 1-D tensor of class indices, got {y.dtype} "
                         f"of shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise InputError(f"{where}: label {bad} is out of range for {num_classes} classes "
                         f"(expected 0..{num_classes - 1}); does the dataset match the model's num_classes?")


def merged_logits(out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """The prediction of a model output (two heads: their mean, as the models do in eval mode)."""
    logits, dist = split_outputs(out)
    return logits if dist is None else (logits + dist) / 2


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 256,
             ctx: DistContext | None = None, amp: str = "off", workers: int = 0, desc: str = "eval",
             where: str = "dataset", flip: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy of ``model`` on ``dataset`` (eval mode; with two
    heads the prediction is their mean). Sums are reduced over ranks. Returns ``loss, acc1, acc5, count``.
    ``flip``: test-time augmentation, the logits averaged over each image and its horizontal mirror."""
    ctx = ctx or DistContext()
    net = unwrap_model(model)
    loader = DataLoader(batched(dataset), batch_size=batch_size,
                        sampler=ShardedSampler(dataset, ctx.world_size, ctx.rank), num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", collate_fn=collate)
    dtype = amp_dtype(amp, ctx.device)
    k = min(5, num_classes)
    sums = {"loss": 0.0, "correct1": 0.0, "correct5": 0.0, "count": 0.0}
    with eval_mode(net):
        for x, y in progress(loader, desc=desc, leave=False, dynamic_ncols=True):
            check_labels(y, num_classes, where)
            x, y = time_first(x).to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with autocast(ctx.device, dtype):
                logits = merged_logits(net(x)).float()
                if flip:
                    logits = (logits + merged_logits(net(x.flip(-1))).float()) / 2
            top = logits.topk(k, dim=-1).indices
            sums["loss"] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums["correct1"] += float((top[:, 0] == y).sum())
            sums["correct5"] += float((top == y[:, None]).any(dim=-1).sum())
            sums["count"] += y.numel()
    sums = all_reduce_sums(sums)
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "acc1": 100.0 * sums["correct1"] / n, "acc5": 100.0 * sums["correct5"] / n,
            "count": int(sums["count"])}
