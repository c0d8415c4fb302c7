"""One training run in its folder (:class:`Run`): data, teacher, student, the loop, the final evaluation.

A run: build the dataset bundle; fill every model's ``num_classes`` / ``in_channels`` / ``img_size`` from it
(and ``time_steps``: resolved once, :func:`~bestformer.training.config.resolve_time_steps`); obtain the teacher (a
checkpoint, or a registered architecture trained first in ``<run>/teacher``, then frozen); build the student; train
with model selection on the validation split; evaluate the best weights once on the test split. Seeds are reset
before each model is built, so the student starts from the same weights whether its teacher was trained in this
process or loaded from disk (which exact resume needs).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import build_datasets
from ..errors import ConfigError, InputError
from ..fileio import read_json
from ..hardware import cpu_info
from ..models import create_model
from ..neurons import supported_backends, use_backend
from ..training.budget import parse_duration, plan_budget
from ..training.checkpoint import check_fits, load_weights
from ..training.config import TrainConfig
from ..training.dist import DistContext, broadcast_module, broadcast_object
from ..training.engine import Trainer
from ..training.evaluation import log_main
from ..training.result import TrainResult, parameter_counts
from ..training.runs import RunFolder
from ..training.state import ResumeState, load_resume_state
from ..version import __version__
from .config import (
    check_same_run,
    execution_config,
    make_distiller,
    model_options,
    resolve_distill,
    resolve_time_steps,
    run_is_done,
)
from .evaluation import evaluate_best, write_profile
from .ranks import agreed_checkpoint, load_on_main, locked, shared_checkpoint
from .teacher import check_teacher_architecture, is_saved_teacher, load_teacher

#: seconds set aside after training for the profile written beside the checkpoints
PROFILE_SECONDS = 10.0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (every device); ``deterministic`` also restricts torch to deterministic
    algorithms (and cuDNN to its deterministic kernels)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


@contextlib.contextmanager
def caller_state_kept() -> Iterator[None]:
    """Put back, when a run ends, the process-wide state it sets: torch's switches (deterministic algorithms,
    cuDNN's, the thread count) and the random generators it seeds (Python's, numpy's, torch's): ``train()`` called
    from a notebook, a test or a hyper-parameter search leaves the caller's session as it found it (a search that
    drew a value, then trained, drew the same value after every run)."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.deterministic, torch.get_num_threads())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # else the caller has no CUDA stream to keep
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if cuda else None)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]
        if torch.get_num_threads() != saved[4]:
            torch.set_num_threads(saved[4])
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        if rngs[3] is not None:
            torch.cuda.set_rng_state_all(rngs[3])


def check_model_builds(name: str, options: dict[str, Any]) -> None:
    """Build the model on the ``meta`` device, nothing allocated and torch's random stream restored after, so that
    invalid options fail before any data or teacher time is spent (a model that reads values while it is built
    cannot be built there: it is checked when it is built for real)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            create_model(name, **options)
        except (NotImplementedError, RuntimeError) as err:
            if "meta" not in str(err):
                raise


def choose_backend(name: str | None) -> str:
    """The LIF backend: ``name``, else ``"fused"`` when registered, else ``"plain"``."""
    return name or ("fused" if "fused" in supported_backends() else "plain")


def load_bundle(cfg: TrainConfig, time_steps: int) -> Any:
    """The dataset bundle of a run (event data binned into ``time_steps`` frames)."""
    return build_datasets(cfg.dataset, cfg.data_dir, time_steps=time_steps, split_by=cfg.split_by,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, download=cfg.download, limit=cfg.limit)


class Run:
    """One training run in ``folder`` (a teacher run is another ``Run`` in ``folder/teacher``)."""

    def __init__(self, cfg: TrainConfig, folder: RunFolder, ctx: DistContext, recipe: str | None,
                 role: str = "model", started: float | None = None) -> None:
        self.cfg, self.folder, self.ctx, self.recipe, self.role = cfg, folder, ctx, recipe, role
        self.started = time.perf_counter() if started is None else started  # a time budget counts from here

    def execute(self, bundle: Any = None) -> TrainResult:
        cfg, folder, ctx = self.cfg, self.folder, self.ctx
        t0 = time.perf_counter()
        state = load_resume_state(folder.resume_path) if agreed_checkpoint(folder) else None
        if state is not None:
            check_same_run(state.progress, cfg, folder.resume_path)
            p, summary = state.progress, folder.path / "summary.json"
            done = summary.is_file() and run_is_done(p, cfg)
            # rank 0's verdict and summary for every rank (only it is sure to see the run folder's latest files)
            final = broadcast_object(read_json(summary, "run summary") if done and ctx.is_main else None)
            if final is not None:
                log_main(ctx, f"{folder.path} has already finished")
                return TrainResult.from_summary(final, p.get("history", []))
        cfg = self.cfg = execution_config(cfg, None if state is None else state.progress, ctx)
        time_steps = resolve_time_steps(cfg)  # the one resolution of T, passed down; an unknown model fails here
        folder.prepare()  # a read-only or missing folder fails now, before the data are read
        if cfg.log == "tensorboard" and folder.enabled:
            from ..training.tensorboard import TensorBoardLog  # the optional extra: imported only when asked for

            folder.tensorboard = TensorBoardLog(folder.path / "tensorboard")
        try:
            # for this run only: no global is changed
            with use_backend(choose_backend(cfg.neuron_backend)), caller_state_kept():
                return self._execute(cfg, folder, ctx, state, t0, bundle, time_steps)
        finally:
            if folder.tensorboard is not None:
                folder.tensorboard.close()

    def _execute(self, cfg: TrainConfig, folder: RunFolder, ctx: DistContext, state: ResumeState | None,
                 t0: float, bundle: Any, time_steps: int) -> TrainResult:
        if cfg.threads is not None:  # torch's kernels and the fused LIF kernels' thread pool follow it
            torch.set_num_threads(cfg.threads)
        backend = choose_backend(cfg.neuron_backend)
        if bundle is None:
            bundle = load_bundle(cfg, time_steps)
            log_main(ctx, f"data: {bundle.describe()}")
        if len(bundle.train) == 0:
            raise InputError(f"{bundle.name}: the training split is empty")
        if cfg.rand_augment and bundle.is_event:
            raise ConfigError(f"rand_augment works on static images; {bundle.name} has event frames (set it to null)")
        if cfg.time_step_schedule and bundle.is_event:
            raise ConfigError(f"time_step_schedule works on static images; {bundle.name} has event frames, which "
                              "fix T (set it to null)")
        options = model_options(bundle, time_steps, cfg.model_args)
        check_model_builds(cfg.model, options)  # bad --model-arg values fail now, not after a teacher's training
        info = {"recipe": self.recipe, "role": self.role, "world_size": ctx.world_size,
                "global_batch": cfg.batch_size * cfg.accum_steps * ctx.world_size, "device": str(ctx.device),
                "neuron_backend": backend, "library_version": __version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "cpu": cpu_info().describe(), "dataset": bundle.describe()}
        folder.write_config(cfg.to_dict(), info)

        distill = resolve_distill(cfg)
        teacher_result, teacher = None, None
        if cfg.teacher is not None:
            teacher, teacher_result = self.teacher(bundle, time_steps)
            if teacher_result is not None and teacher_result.status == "interrupted":
                return TrainResult(folder.path, "interrupted", cfg.model, 0, teacher=teacher_result,
                                   stopped_by=teacher_result.stopped_by)

        seed_everything(cfg.seed, cfg.deterministic)
        student = create_model(cfg.model, **options)
        if cfg.init is not None and state is None:  # fine-tuning starts from these weights (a resume has its own)
            source, note = shared_checkpoint(cfg.init, ctx), ""
            if getattr(source, "num_classes", student.num_classes) != student.num_classes:  # another label set
                note = f" (its {source.num_classes}-class head replaced by a new {student.num_classes}-class one)"
                source.reset_classifier(student.num_classes)
            check_fits(student, source.state_dict(), f"--init {cfg.init} ({source.model_name})")
            student.load_state_dict(source.state_dict())
            log_main(ctx, f"initialised from {cfg.init}{note}")
        distiller = None if teacher is None else make_distiller(distill, teacher, student, cfg.label_smoothing)
        extra = {"recipe": self.recipe, "dataset": cfg.dataset, "distill": distill, "role": self.role}
        trainer = Trainer(student, cfg, bundle.train, bundle.val, num_classes=bundle.num_classes, run=folder,
                          distiller=distiller, ctx=ctx, config_extra=extra, mean=bundle.mean, std=bundle.std)
        trainer.clock0 = self.started  # before load_state, which moves it back by a resumed run's earlier segments
        if state is not None:
            trainer.load_state(state)
            p = trainer.progress
            if not p.finished:
                log_main(ctx, f"resuming {folder.path} at epoch {p.epoch + 1}, step {p.global_step} "
                              f"({p.samples_seen} samples seen)")
        before = trainer.progress.wall_s  # the wall seconds of a resumed run's earlier segments (else 0)
        if cfg.time_budget is not None and state is None:
            cfg = self.cfg = self._plan_budget(trainer, bundle, info)
        p = trainer.progress
        if p.finished and p.epoch < trainer.schedule.total_epochs and not p.stopped_early:
            p.finished = False  # more epochs were asked for on resume
        name = "teacher" if self.role == "teacher" else cfg.model
        log_main(ctx, f"training {name} ({cfg.model}) for {trainer.schedule.total_epochs} epochs, "
                      f"{trainer.sampler.steps_per_epoch} steps each, global batch {trainer.global_batch}, "
                      f"on {ctx.device} (neuron backend {backend}) -> {folder.path}")
        status = trainer.fit() if not p.finished else ("stopped_early" if p.stopped_early else "finished")
        result = TrainResult(folder.path, status, cfg.model, p.epoch, p.best_epoch, teacher=teacher_result,
                             params=parameter_counts(student), history=p.history, stopped_by=trainer.stopped_by)
        if status == "interrupted":
            return result
        # the best weights, evaluated once on validation (for the table) and on the test split
        load_on_main(ctx, lambda: load_weights(student, folder.weights_path("best")))
        broadcast_module(student)
        evaluate_best(result, trainer.model, bundle, cfg, ctx, p.history, p.best_epoch)
        result.seconds = before + time.perf_counter() - t0
        folder.write_summary(result.summary())
        if self.role == "model" and ctx.is_main:
            log_main(ctx, write_profile(student, bundle, folder.path / "profile.json"))
            if folder.tensorboard is not None and (folder.path / "profile.json").is_file():
                folder.tensorboard.profile(read_json(folder.path / "profile.json", "profile"), p.epoch)
        return result

    def _plan_budget(self, trainer: Trainer, bundle: Any, info: dict[str, Any]) -> TrainConfig:
        """Measure this machine's step and validation times, then fix ``max_steps`` so that the run ends within
        ``time_budget`` (counted from the start of the run, teacher included); records the plan in
        ``config.yaml`` / ``run.json`` and arms the trainer's deadline."""
        cfg = self.cfg
        budget = parse_duration(str(cfg.time_budget))
        # every rank must plan the same step count: rank 0's measurement and clock count
        probe = bundle.val if bundle.val is not None and len(bundle.val) else bundle.test  # the test pass counts too
        step_s, per_sample, elapsed = broadcast_object((*trainer.measure_costs(eval_set=probe),
                                                        time.perf_counter() - self.started))
        eval_s = per_sample * (len(bundle.val) if bundle.val is not None else 0)
        test_s = per_sample * (len(bundle.test) if bundle.test is not None else 0)
        final_s = test_s + PROFILE_SECONDS  # the best epoch's validation is reused, not repeated
        plan = plan_budget(budget, elapsed, step_s,
                           trainer.planned_schedule,
                           trainer.sampler.steps_per_epoch, eval_s, final_s)
        trainer.set_max_steps(plan.total_steps)
        cfg = trainer.cfg
        trainer.deadline = self.started + budget - final_s
        trainer.plan, trainer.plan_end = plan, trainer.deadline - plan.reserve_s
        self.folder.write_config(cfg.to_dict(), {**info, "budget_plan": plan.to_dict()})
        log_main(self.ctx, plan.describe())
        return cfg

    def teacher(self, bundle: Any, time_steps: int) -> tuple[nn.Module, TrainResult | None]:
        """The frozen teacher: a checkpoint, or a registered architecture trained in ``<run>/teacher`` (the
        config of :meth:`~bestformer.training.config.TrainConfig.teacher_config`; event data keep their frames)."""
        spec = str(self.cfg.teacher)
        if is_saved_teacher(spec):
            return load_teacher(spec, bundle, self.ctx), None
        check_teacher_architecture(spec)
        tcfg = self.cfg.teacher_config(spec, time_steps if bundle.is_event else None)
        run = Run(tcfg, self.folder.teacher, self.ctx, self.recipe, role="teacher", started=self.started)
        with locked(self.folder.teacher, self.ctx):  # a --resume of the teacher folder itself must wait for us
            result = run.execute(bundle)
        if result.status == "interrupted":
            return nn.Identity(), result
        return shared_checkpoint(self.folder.teacher.weights_path("best"), self.ctx), result
