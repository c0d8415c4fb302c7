"""The training engine: :class:`Trainer` (one model, one dataset, the loop) and :func:`evaluate`.

Design (ours; the papers train with timm's script):

- Distributed-ready: the trainer takes a :class:`~bestformer.training.dist.DistContext` (rank, world size,
  device); data come from a :class:`~bestformer.training.dist.ShardedBatchSampler` whose micro-batches carry their
  loss weights (``accum_steps`` micro-batches per optimizer step, global batch ``batch_size x accum_steps x
  world_size``); metrics are reduced as sums over ranks; every branch the ranks must take alike (a stop signal,
  the deadline, a skipped step, a re-planned budget) is agreed; only rank 0 writes, prints and shows progress.
  In a single process all of this reduces to a plain loop.
- Exact resume: the position is the number of samples seen (valid on another world size with the same global
  batch); the learning rate, data order and augmentation are functions of the step / epoch and seed; the resume
  file (:mod:`.state`) holds weights, optimizer, scaler, RNG states, history and the partial sums of an
  interrupted epoch. Checkpoints are written at every epoch's end and, with ``ckpt_every_steps``, every N steps.
- Reliability: SIGINT / SIGTERM finish the current step, write a checkpoint and return ``"interrupted"``; a NaN /
  inf loss or gradient stops the run with :class:`NonFiniteLossError` (or skips up to ``skip_nonfinite`` steps);
  gradient norms and sampled per-layer firing rates are logged, and layers that never fire (dead) or always fire
  (saturated) are reported as warnings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import time_first
from ..errors import BestformerError, FileFormatError
from .budget import BudgetPlan, TimeStepSchedule, parse_time_step_schedule
from .config import TrainConfig
from .dist import DistContext, ShardedBatchSampler, all_reduce_sums, gradient_sync, progress, unwrap_model
from .dist.collectives import broadcast_tensors
from .distill import Distiller, soft_cross_entropy, split_outputs
from .evaluation import amp_dtype, autocast, check_labels, evaluate, log_main, merged_logits
from .factories import (
    build_augmentation,
    build_loader,
    build_optimizer,
    build_sampler,
    build_schedule,
    build_time_step_schedule,
    prepare_model,
)
from .measure import measure_costs, refit_plan
from .monitor import FiringRateMonitor, layer_health
from .runs import RunFolder
from .signals import StopSignals
from .state import EpochSums, Progress, ResumeState, global_epoch_sums

# evaluate, StopSignals, EpochSums and Progress moved to .evaluation / .signals / .state; importable from here too
__all__ = ["EpochSums", "NonFiniteLossError", "Progress", "StopSignals", "Trainer", "evaluate"]


class NonFiniteLossError(BestformerError):
    """A NaN or inf loss (or gradient) stopped the run."""


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains ``model`` on ``train_set`` with the options of ``cfg``, validating on ``val_set`` every epoch.

    Args:
        model: a model built with :func:`bestformer.create_model` (its checkpoints must name it).
        cfg: the run's options (:class:`~bestformer.training.config.TrainConfig`).
        train_set, val_set: map-style datasets of ``(x, y)`` (``val_set`` may be ``None``: the last epoch
            is then kept as best).
        num_classes: labels are checked against it.
        run: the run folder (checkpoints, metrics, plots; only rank 0 writes).
        distiller: a :class:`~bestformer.training.distill.Distiller` holding the frozen teacher, or ``None``.
        ctx: rank, world size and device (a single process on ``ctx.device`` by default).
        sampler: the batch sampler of this rank (default: a :class:`ShardedBatchSampler` for ``ctx`` with the
            config's batch size, accumulation and seed); it must yield the micro-batches of
            ``sampler.micro_batches()``.
        config_extra: more to store in every checkpoint's sidecar (e.g. the recipe's name).
        mean, std: the normalization of ``train_set``'s images (RandAugment works on un-normalized pixels).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: Dataset, val_set: Dataset | None, *,
                 num_classes: int, run: RunFolder, distiller: Distiller | None = None,
                 ctx: DistContext | None = None, sampler: ShardedBatchSampler | None = None,
                 config_extra: dict[str, Any] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.cfg, self.run, self.num_classes = cfg, run, num_classes
        self.ctx = ctx or DistContext()
        self.dev = self.ctx.device
        self.stopped_by: str | None = None  # the signal (SIGINT / SIGTERM) that interrupted fit()
        self.train_set, self.val_set = train_set, val_set
        self.model = prepare_model(model, cfg, self.ctx)
        self.module = unwrap_model(self.model)
        self.distiller = distiller.to(self.dev) if distiller is not None else None
        self.config_extra = config_extra or {}
        self.optimizer = build_optimizer(self.module, cfg)
        self.dtype = amp_dtype(cfg.amp, self.dev)
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=self.dtype is torch.float16)
        self.sampler = sampler or build_sampler(train_set, cfg, self.ctx)
        self.loader = build_loader(train_set, self.sampler, cfg, self.dev)
        self.set_max_steps(cfg.max_steps)
        self.time_schedule = build_time_step_schedule(cfg, self.module)
        self.deadline: float | None = None  # perf_counter time at which a budgeted run must stop training
        self.plan: BudgetPlan | None = None  # a budgeted run's plan, re-fitted after every epoch until plan_end
        self.plan_end = math.inf
        self._ckpt_s = 0.0
        self.clock0 = time.perf_counter()  # the run's start (less its earlier segments'), for the wall-clock column
        self.augment = build_augmentation(cfg, num_classes, mean, std)
        self.monitor = FiringRateMonitor(self.module)
        self.progress = Progress()
        self.last_checkpoint: str | None = None

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch

    def set_max_steps(self, steps: int | None) -> None:
        """End the run (and its cosine schedule) after ``steps`` optimizer steps; ``None``: after ``epochs +
        cooldown_epochs`` epochs. Recorded in the config, which the checkpoints save: a resume ends at the same step."""
        self.cfg = self.cfg if steps == self.cfg.max_steps else self.cfg.replace(max_steps=steps)
        self.schedule, self.total_steps = build_schedule(self.cfg, self.sampler.global_batch,
                                                         self.sampler.steps_per_epoch, steps)

    @property
    def planned_schedule(self) -> TimeStepSchedule:
        """The time-step schedule a budget is planned with (one phase at the model's T without a schedule)."""
        return self.time_schedule or parse_time_step_schedule(None, self.module.time_steps)

    def _set_time_steps(self, step: int | None) -> None:
        """``T`` of the time-step schedule at ``step`` (``None``: the model's own, for evaluation)."""
        if self.time_schedule is None:
            return
        t = self.time_schedule.final if step is None else self.time_schedule.at(step, self.total_steps)
        if t != self.module.time_steps:
            self.module.set_time_steps(t)

    def measure_costs(self, steps: int = 2, eval_batches: int = 2, eval_set: Dataset | None = None
                      ) -> tuple[dict[int, float], float]:
        """Step seconds and evaluation seconds per sample here (:func:`~.measure.measure_costs`), for a budget."""
        return measure_costs(self, steps, eval_batches, eval_set)

    # ------------------------------------------------------------------------------------------- state
    def load_state(self, state: ResumeState) -> None:
        """Continue from a resume state (weights, optimizer, scaler, RNG, position, history)."""
        state.restore(self.module, self.optimizer, self.scaler, len(self.train_set), self.global_batch)
        self.progress = Progress.from_json(state.progress, main=self.ctx.is_main)
        self.clock0 -= self.progress.wall_s  # a resumed run's clock goes on from where it was saved
        self.monitor.load(self.progress.spikes)
        self.last_checkpoint = str(state.path)

    def _progress_json(self) -> dict[str, Any]:
        # a mid-epoch save holds the epoch's sums over all ranks: a resume on any number of processes is exact
        sums, spikes = global_epoch_sums(self.progress.sums, self.monitor.counts())
        return {**asdict(self.progress), "sums": sums, "spikes": {k: list(v) for k, v in spikes.items()},
                "config": self.cfg.to_dict(), "train_size": len(self.train_set),
                "model_name": self.module.model_name,
                "model_args": self.module.model_args, "global_batch": self.global_batch,
                "world_size": self.ctx.world_size}

    def checkpoint(self, *, best: bool = False) -> None:
        """Write ``best`` (when asked), the resume state, then ``last`` (rank 0), in that order: a crash at
        any point leaves a resume state consistent with its own weights, and ``best`` never older than it."""
        p = self.progress
        p.wall_s = time.perf_counter() - self.clock0
        meta = {"epoch": p.epoch, "step": p.global_step, "samples_seen": p.samples_seen,
                "config": self.cfg.to_dict(), **self.config_extra}
        if p.history:
            meta["metrics"] = p.history[-1]
        t0 = time.perf_counter()
        if best:
            self.run.save_model("best", self.module, meta)
        self.run.save_resume(self.module, self.optimizer, self.scaler, self._progress_json())
        self.run.save_model("last", self.module, meta)
        self.last_checkpoint = str(self.run.resume_path)
        self._ckpt_s = time.perf_counter() - t0

    # -------------------------------------------------------------------------------------------- steps
    def loss(self, x: Tensor, target: Tensor, out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Eq. 15 through the distiller, or the (label-smoothed) cross-entropy; a two-head student without
        a teacher trains both heads on the labels (our choice: the mean of the two cross-entropies)."""
        if self.distiller is not None:
            return self.distiller(x, target, out)
        logits, dist = split_outputs(out)
        loss = soft_cross_entropy(logits, target, self.cfg.label_smoothing)
        if dist is not None:
            loss = (loss + soft_cross_entropy(dist, target, self.cfg.label_smoothing)) / 2
        return loss

    def _nonfinite(self, what: str) -> None:
        p, cfg = self.progress, self.cfg
        where = f"step {p.global_step} (epoch {p.epoch + 1})"
        if p.skipped_total < cfg.skip_nonfinite:
            p.skipped_total += 1
            log_main(self.ctx, f"warning: {what} at {where}; step skipped ({p.skipped_total} of "
                              f"--skip-nonfinite {cfg.skip_nonfinite})", err=True)
            return
        ckpt = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")
        hint = ("lower --lr, set --clip-grad, check the data for NaN/inf values, or allow a few bad steps with "
                "--skip-nonfinite N")
        raise NonFiniteLossError(f"{what} at {where}; {ckpt}; {hint}")

    def _micro_batches(self) -> Iterator[tuple[Tensor, Tensor, Any]]:
        for (x, y), mb in zip(self.loader, self.sampler.micro_batches()):
            yield x, y, mb

    def train_epoch(self, stop: StopSignals) -> str | None:
        """Run (the rest of) the current epoch; returns ``"interrupted"`` when a signal stopped it."""
        cfg, p = self.cfg, self.progress
        sums = EpochSums(**p.sums)
        steps_per_epoch = self.sampler.steps_per_epoch
        # the position is keyed on the samples seen: exact on another world size with the same global batch
        epoch = self.sampler.resume(p.samples_seen)
        if epoch == p.epoch + 1 and self.sampler.start_step == 0:  # stopped after the last step, before end_epoch
            self.sampler.set_epoch(p.epoch, steps_per_epoch)
        elif epoch != p.epoch:
            raise FileFormatError(f"{self.last_checkpoint}: {p.samples_seen} samples seen do not fall in epoch "
                                  f"{p.epoch + 1} of {len(self.train_set)} samples; the resume state is inconsistent")
        if p.global_step >= self.total_steps:  # a stop signal came with the run's last step: nothing left to train
            return None
        start_step = self.sampler.start_step
        mix = cfg.mixup_off_epoch == 0 or p.epoch < cfg.mixup_off_epoch
        self.model.train()
        t0 = time.perf_counter()
        bar = progress(total=steps_per_epoch, initial=start_step, desc=f"epoch {p.epoch + 1}/"
                       f"{self.schedule.total_epochs}", dynamic_ncols=True, leave=True)
        step, step_bad = EpochSums(), False  # a step's sums join the epoch's only if the step is taken
        saved_buffers: list[Tensor] | None = None
        try:
            for x, y, mb in self._micro_batches():
                if cfg.skip_nonfinite and saved_buffers is None:
                    # a skipped step must not leave NaN in the BatchNorm statistics either
                    saved_buffers = [b.detach().clone() for b in self.module.buffers()]
                check_labels(y, self.num_classes, "training split")
                self._set_time_steps(p.global_step)
                x = time_first(x).to(self.dev, non_blocking=True)
                y = y.to(self.dev, non_blocking=True)
                x, target = self.augment(x, y, p.global_step, mix, mb.slot)
                sample = bool(cfg.monitor_every) and p.global_step % cfg.monitor_every == 0 and mb.count > 0
                with gradient_sync(self.model, mb.last), self.monitor.sampling(sample):
                    with autocast(self.dev, self.dtype):
                        out = self.model(x)
                        loss = self.loss(x, target, out)
                    self.scaler.scale(loss * mb.loss_weight).backward()
                loss_val = float(loss.detach())
                if not math.isfinite(loss_val):
                    step_bad = True
                elif mb.count:
                    step.loss += loss_val * mb.count
                    pred = merged_logits(out).detach().argmax(dim=-1)
                    label = target.argmax(dim=-1) if target.dim() == 2 else target
                    step.correct += float((pred == label).sum())
                    step.count += mb.count
                if not mb.last:
                    continue
                if self.scaler.is_enabled():  # else a rank's NaN reaches every rank through the gradient all-reduce
                    step_bad = self._any_rank(step_bad)
                lr = self.schedule.apply(self.optimizer, p.global_step)
                self.scaler.unscale_(self.optimizer)
                norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad or math.inf))
                scaler_skips = self.scaler.is_enabled() and not math.isfinite(norm) and not step_bad
                if step_bad or (not math.isfinite(norm) and not scaler_skips):
                    self._nonfinite("non-finite loss" if step_bad else f"non-finite gradient norm ({norm})")
                    sums.skipped += 1
                    if saved_buffers is not None:
                        with torch.no_grad():
                            for buf, old in zip(self.module.buffers(), saved_buffers):
                                buf.copy_(old)
                else:
                    self.scaler.step(self.optimizer)
                    sums.steps += 1
                    sums.add_step(step)
                    sums.add_norm(norm)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                step, step_bad, saved_buffers = EpochSums(), False, None
                p.global_step += 1
                p.samples_seen += mb.step_count
                bar.update(1)
                bar.set_postfix(loss=f"{sums.loss / max(sums.count, 1):.4f}", lr=f"{lr:.2e}", refresh=False)
                p.sums = {**asdict(sums), "seconds": sums.seconds + time.perf_counter() - t0, "lr": lr}
                if self._stop_requested(stop):
                    self.checkpoint()
                    return "interrupted"
                if p.global_step >= self.total_steps:
                    break
                if self.deadline is not None and self._any_rank(time.perf_counter() > self.deadline):
                    log_main(self.ctx, f"warning: the time budget ran out at step {p.global_step} of the planned "
                                      f"{self.total_steps} (the machine was slower than measured); training stops "
                                      "here, before the schedule's end", err=True)
                    self.set_max_steps(p.global_step)
                    break
                if cfg.ckpt_every_steps and p.global_step % cfg.ckpt_every_steps == 0 \
                        and sums.steps + sums.skipped < steps_per_epoch:
                    self.checkpoint()
        finally:
            bar.close()
        return None

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether any rank received a stop signal (all ranks must stop at the same step)."""
        return self._any_rank(stop.received is not None)

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the ranks, for a branch all must take alike (or collectives would mismatch)."""
        if self.ctx.is_distributed:
            return all_reduce_sums({"flag": float(flag)})["flag"] > 0
        return flag

    def end_epoch(self) -> bool:
        """Validate, log, checkpoint; returns True when early stopping ends the run."""
        cfg, p = self.cfg, self.progress
        sums = dict(p.sums)
        val = None
        t_end = time.perf_counter()
        trained_t = self.module.time_steps if hasattr(self.module, "time_steps") else None
        self._set_time_steps(None)  # evaluation at the model's own T
        if self.val_set is not None:
            # rank 0's BatchNorm statistics (those it saves) on every rank: each rank's last micro-batch moved its own
            broadcast_tensors(self.module.buffers())
            val = evaluate(self.model, self.val_set, num_classes=self.num_classes, batch_size=cfg.batch_size,
                           ctx=self.ctx, amp=cfg.amp, workers=cfg.workers, desc="validate",
                           where="validation split", flip=cfg.eval_flip)
        train, counts = global_epoch_sums(sums, self.monitor.counts())
        self.monitor.reset()
        rates = {k: f / t for k, (f, t) in counts.items() if t}
        dead, saturated = layer_health(counts)
        row = {
            "epoch": p.epoch + 1, "step": p.global_step, "samples": p.samples_seen,
            "lr": sums["lr"],
            "train_loss": train["loss"] / max(train["count"], 1),
            "train_acc": 100.0 * train["correct"] / max(train["count"], 1),
            "val_loss": val["loss"] if val else math.nan, "val_acc": val["acc1"] if val else math.nan,
            "val_top5": val["acc5"] if val else math.nan,
            "grad_norm": sums["grad_norm"] / max(sums["grad_norm_steps"], 1), "grad_norm_max": sums["grad_norm_max"],
            "firing_rate": sum(rates.values()) / len(rates) if rates else math.nan,
            "dead_layers": len(dead), "saturated_layers": len(saturated), "skipped_steps": sums["skipped"],
            "time_s": sums["seconds"], "wall_s": time.perf_counter() - self.clock0, "time_steps": trained_t,
        }
        p.history.append(row)
        if rates:
            p.firing.append({"epoch": p.epoch + 1, **rates})
        for kind, names in (("dead (never fired)", dead), ("saturated (fired at every position and step)",
                                                           saturated)):
            if names:
                log_main(self.ctx, f"warning: epoch {p.epoch + 1}: {len(names)} spiking layer(s) {kind} in the "
                                  f"sampled steps: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}", err=True)
        score = row["val_acc"] if val else row["train_acc"]
        improved = val is None or p.best_acc is None or score > p.best_acc
        if improved:
            p.best_acc, p.best_epoch, p.bad_epochs = score, p.epoch + 1, 0
        else:
            p.bad_epochs += 1
        val_txt = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%" if val else "no validation split"
        fr_txt = f" | firing rate {row['firing_rate']:.3f}" if rates else ""
        log_main(self.ctx, f"epoch {p.epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | "
                          f"{val_txt} | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3g}{fr_txt} | "
                          f"{row['time_s']:.1f} s")
        p.epoch += 1
        p.sums = asdict(EpochSums())
        refit_plan(self, sums["seconds"], time.perf_counter() - t_end + self._ckpt_s)
        early = bool(cfg.patience) and p.bad_epochs >= cfg.patience
        p.finished = early or p.epoch >= self.schedule.total_epochs or p.global_step >= self.total_steps
        p.stopped_early = early and p.epoch < self.schedule.total_epochs
        self.run.write_history(p.history, p.firing)
        self.checkpoint(best=improved)
        return early

    def fit(self) -> str:
        """Train until the last epoch, early stopping or a stop signal. Returns ``"finished"``,
        ``"stopped_early"`` or ``"interrupted"``."""
        p = self.progress
        self.run.write_history(p.history, p.firing)  # drop rows of epochs a crash left unfinished
        with StopSignals(self.ctx) as stop:
            while not p.finished:
                interrupted = self.train_epoch(stop) == "interrupted"
                if not interrupted:
                    if self.end_epoch():
                        log_main(self.ctx, f"early stopping: no better validation accuracy in {self.cfg.patience} "
                                          f"epochs (best {p.best_acc:.2f}% at epoch {p.best_epoch})")
                        break
                    interrupted = self._stop_requested(stop)
                if interrupted:  # the signal sets the exit code; a rank that saw none was sent torchrun's SIGTERM
                    self.stopped_by = stop.received or "SIGTERM"
                    return "interrupted"
        return "stopped_early" if p.stopped_early else "finished"
