"""What a training step and a validation pass cost on this machine: the measurement a time budget is planned
from (:func:`~.budget.plan_budget`), and the re-plan from what each epoch really cost."""

from __future__ import annotations

import copy
import itertools
import math
import time
from typing import Any

import torch

from ..data import time_first
from .budget import planned_seconds, refit_steps
from .dist.collectives import broadcast_object
from .evaluation import autocast, evaluate, log_main


def measure_costs(tr: Any, steps: int = 2, eval_batches: int = 2, eval_set: Any = None
                  ) -> tuple[dict[int, float], float]:
    """Seconds of one training step of ``tr`` (a :class:`~.engine.Trainer`) at each ``T`` of its schedule
    (forward, backward, data and augmentation on the first batches of the real training split, and the optimizer's
    step; the fastest of ``steps`` after a warm-up step) and the evaluation seconds per sample (``eval_batches``
    batches of ``eval_set``, default the validation split; 0 without one). Weights, BatchNorm statistics, the
    optimizer's state and the gradients are restored: the run starts as if nothing was measured (a test checks the
    weights)."""
    saved = {k: v.detach().clone() for k, v in tr.module.state_dict().items()}
    saved_opt = copy.deepcopy(tr.optimizer.state_dict())
    step_s: dict[int, float] = {}
    tr.model.train()
    try:
        batches = itertools.cycle(tr.loader)  # a small split may hold fewer batches than the measurement
        for t in tr.planned_schedule.time_steps:
            if tr.time_schedule is not None:
                tr.module.set_time_steps(t)
            best = math.inf
            for i in range(steps + 1):
                t0 = time.perf_counter()
                x, y = next(batches)
                x, target = tr.augment(time_first(x).to(tr.dev), y.to(tr.dev), 0, True)
                with autocast(tr.dev, tr.dtype):
                    loss = tr.loss(x, target, tr.model(x))
                tr.scaler.scale(loss).backward()
                tr.scaler.step(tr.optimizer)  # the optimizer's time counts too (its state is restored)
                tr.scaler.update()
                if tr.dev.type == "cuda":
                    torch.cuda.synchronize(tr.dev)
                if i:
                    best = min(best, time.perf_counter() - t0)
                tr.optimizer.zero_grad(set_to_none=True)
            step_s[t] = best
    finally:
        tr.module.load_state_dict(saved)
        tr.optimizer.load_state_dict(saved_opt)
        tr.optimizer.zero_grad(set_to_none=True)
        tr._set_time_steps(None)
    eval_set = tr.val_set if eval_set is None else eval_set
    per_sample = 0.0
    if eval_set is not None and len(eval_set):
        cfg = tr.cfg
        n = min(len(eval_set), eval_batches * cfg.batch_size)
        subset = torch.utils.data.Subset(eval_set, range(n))
        t0 = time.perf_counter()
        # on the run's device and ranks, as the epochs' validation runs (the default context is one CPU process)
        evaluate(tr.model, subset, num_classes=tr.num_classes, batch_size=cfg.batch_size, ctx=tr.ctx, amp=cfg.amp,
                 workers=cfg.workers, flip=cfg.eval_flip, desc="timing")
        per_sample = (time.perf_counter() - t0) / n
    return step_s, per_sample


def refit_plan(tr: Any, train_s: float, overhead_s: float) -> None:
    """A budgeted run of ``tr`` (a :class:`~.engine.Trainer`) after an epoch whose steps took ``train_s`` and whose
    end (validation, checkpoint, logs) took ``overhead_s``: fit the remaining steps to the time left
    (:func:`~.budget.refit_steps`). Rank 0's clock and costs decide for every rank: all must plan one schedule."""
    p, plan = tr.progress, tr.plan
    if plan is None or p.global_step >= tr.total_steps:
        return
    sched = tr.planned_schedule
    first = p.history[-2]["step"] if len(p.history) > 1 else 0  # this epoch's first step
    planned = planned_seconds(plan.step_s, sched, first, p.global_step, tr.total_steps)
    slowdown = train_s / planned if planned > 0 and train_s > 0 else 1.0
    total = broadcast_object(refit_steps(plan.step_s, sched, p.global_step, tr.total_steps, slowdown, overhead_s,
                                         tr.plan_end - time.perf_counter(), tr.sampler.steps_per_epoch, p.epoch))
    if total != tr.total_steps:
        log_main(tr.ctx, f"budget: re-planned to {total} steps (was {tr.total_steps}; steps took x{slowdown:.2f} "
                         f"the measured time, an epoch's end {overhead_s:.1f} s)")
        tr.set_max_steps(total)
