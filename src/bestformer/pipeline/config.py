"""A job's configuration: the config itself (defaults, recipe, command line: :func:`resolve_config`), the
distillation it asks for, the model options filled from the data, and what may change when a run is resumed."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..training.config import (
    TrainConfig,
    config_from_dict,
    flat_options,
    gpu_batch_rule,
    resolve_config,
    resolve_time_steps,
    with_recipe,
)
from ..training.dist import DistContext, replan_batches
from ..training.distill import Distiller, get_distiller, list_distillers
from ..training.evaluation import log_main
from .teacher import is_saved_teacher

__all__ = ["BATCH_LAYOUT", "DATA_FIELDS", "RESUMABLE", "check_resume_length", "check_same_run",
           "distill_choices", "execution_config", "keep_global_batch", "make_distiller", "model_options",
           "resolve_config", "resolve_distill", "resolve_time_steps", "resumed_config", "run_is_done"]

#: options that may change on resume: the run's length, its checkpointing and where / how fast it executes (another
#: device or thread count can change float rounding); the others define the experiment and must stay
RESUMABLE = ("epochs", "cooldown_epochs", "patience", "ckpt_every_steps", "monitor_every", "skip_nonfinite",
             "device", "workers", "threads", "neuron_backend", "channels_last", "sync_bn", "grad_checkpointing",
             "data_dir", "download", "log")
DATA_FIELDS = ("num_classes", "in_channels", "img_size", "time_steps")
#: options that a resume on another number of processes adjusts (keeping batch_size x accum_steps x processes)
BATCH_LAYOUT = ("batch_size", "accum_steps")


def distill_choices() -> list[str]:
    return ["none", *list_distillers()]


def resolve_distill(cfg: TrainConfig) -> str:
    """The distillation of a run (default ``hard`` with a teacher, ``none`` without), checked before any
    training."""
    name = cfg.distill or ("hard" if cfg.teacher is not None else "none")
    if name == "none":
        if cfg.teacher is not None:
            raise ConfigError("a teacher was given with --distill none; drop --teacher or choose a distillation")
        return name
    if cfg.teacher is None:
        raise ConfigError(f"--distill {name} needs a teacher (--teacher PATH or NAME)")
    get_distiller(name)  # an unknown name: one line with the registered choices (fgd's module imported now)
    return name


def make_distiller(name: str, teacher: nn.Module, student: nn.Module, label_smoothing: float) -> Distiller:
    factory = get_distiller(name)
    kwargs: dict[str, Any] = {"label_smoothing": label_smoothing}
    try:
        if "student" in inspect.signature(factory).parameters:
            kwargs["student"] = student
    except (TypeError, ValueError):
        pass
    return factory(teacher, **kwargs)


def model_options(bundle: Any, time_steps: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Options of a model for ``bundle``: its data fields from the dataset (``time_steps``: the run's resolved
    ``T``, :func:`~bestformer.training.config.resolve_time_steps`), then ``extra``. Static images take a model
    option ``time_steps`` (a command line that also gives ``--time-steps`` is refused by ``resolve_config``)."""
    data = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, "img_size": bundle.img_size,
            "time_steps": time_steps}
    for key in DATA_FIELDS:
        if key in extra and extra[key] != data[key] and not (key == "time_steps" and not bundle.is_event):
            raise ConfigError(f"model option {key}={extra[key]!r} contradicts the dataset {bundle.name} "
                              f"({key}={data[key]}); leave it out, it is filled from the data")
    return {**data, **extra}


def check_same_run(progress: dict[str, Any], cfg: TrainConfig, where: Any) -> None:
    """A resume state's config must equal ``cfg`` except for :data:`RESUMABLE` and the batch layout."""
    saved = progress.get("config", {})
    # the per-process layout follows the number of processes (a teacher's is derived from its student's): what
    # must stay is the global batch, which keep_global_batch and Trainer.load_state check
    changed = [k for k in saved if k not in (*RESUMABLE, *BATCH_LAYOUT) and saved.get(k) != cfg.to_dict().get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"{where} was trained with {k}={saved[k]!r}, not {getattr(cfg, k)!r}: "
                          f"only {', '.join(RESUMABLE)} may change on --resume")


def keep_global_batch(cfg: TrainConfig, progress: dict[str, Any], ctx: DistContext) -> TrainConfig:
    """On resume, the run's global batch on this run's number of processes (see
    :func:`~bestformer.training.dist.replan_batches`); the batch size and accumulation are adjusted, and recorded."""
    saved = progress.get("global_batch")
    if saved is None or saved == cfg.batch_size * cfg.accum_steps * ctx.world_size:
        return cfg
    plan = replan_batches(saved, ctx.world_size, cfg.batch_size)
    log_main(ctx, f"resuming on {ctx.world_size} process(es) instead of {progress.get('world_size')}: global batch "
                  f"{saved} kept as batch size {plan.batch_size} x accumulation {plan.accum_steps} x "
                  f"{ctx.world_size} process(es)")
    return cfg.replace(batch_size=plan.batch_size, accum_steps=plan.accum_steps)


def run_is_done(progress: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a resume state ends its run under ``cfg`` (whose ``epochs`` a resume may raise): it stopped early,
    trained all the epochs, or reached the step cap (``max_steps``: a budget's plan, or its deadline's stop)."""
    return bool(progress.get("finished")) and bool(
        progress.get("stopped_early") or progress.get("epoch", 0) >= cfg.epochs + cfg.cooldown_epochs
        or (cfg.max_steps is not None and progress.get("global_step", 0) >= cfg.max_steps))


def execution_config(cfg: TrainConfig, progress: dict[str, Any] | None, ctx: DistContext) -> TrainConfig:
    """The config a run executes with on ``ctx``. A resumed run (``progress``: its resume state) keeps its global
    batch (:func:`keep_global_batch`). A new run takes the recipe's ``cuda_batch_size`` on a GPU (``lr_scaling``
    follows), and a teacher trained in the run (an architecture) gets its epochs fixed now, so that a resume with
    more ``--epochs`` keeps the teacher the student was distilled from."""
    if progress is not None:
        return keep_global_batch(cfg, progress, ctx)
    if cfg.cuda_batch_size is not None and ctx.device.type == "cuda" and cfg.batch_size != cfg.cuda_batch_size:
        cfg = cfg.replace(batch_size=cfg.cuda_batch_size)
    if cfg.teacher is not None and not is_saved_teacher(str(cfg.teacher)) and cfg.teacher_epochs is None:
        cfg = cfg.replace(teacher_epochs=cfg.epochs)
    return cfg


def resumed_config(saved: dict[str, Any], recipe: str | None, overrides: dict[str, Any], where: str,
                   implied: str | None = None) -> TrainConfig:
    """The config of a resumed run: its ``saved`` options, with those of ``overrides`` that changed (only
    :data:`RESUMABLE` ones may). ``recipe``: the original command's ``--recipe``, whose values count as given.
    Without one only the options given count, their mappings (``--model-arg``) merged over ``implied``: the
    recipe the run started from, as they were then."""
    explicit = flat_options(overrides, "options")  # the options the command itself gives
    if recipe is not None:  # the original command repeated: its recipe's values count as given
        given = gpu_batch_rule(with_recipe(None if recipe.lower() == "none" else recipe, overrides), overrides)
    else:
        given = dict(explicit)
        mappings = [k for k in ("model_args", "teacher_args") if k in given]
        if implied is not None and mappings:
            try:
                # filtered for the run's own model and teacher, as when it started (with_recipe)
                merged = with_recipe(implied, {**{k: saved[k] for k in ("model", "teacher") if k in saved},
                                               **overrides})
            except ConfigError:  # the recipe file is gone or changed: the mappings compare as given
                merged = given
            given.update({k: merged[k] for k in mappings})
    asked = config_from_dict({**saved, **given}, "options").to_dict()
    # a run on CUDA trained at its recipe's cuda_batch_size: the recipe's CPU batch_size repeated is no change
    on_cuda = saved.get("cuda_batch_size") is not None and saved.get("batch_size") == saved.get("cuda_batch_size")
    # a key the run never recorded (an option added since) ran at its default: only an explicit value changes it
    changed = [k for k in given if asked[k] != saved.get(k) and (k in saved or k in explicit)
               and not (k == "batch_size" and on_cuda and k not in explicit)]
    bad = [k for k in changed if k not in RESUMABLE]
    if bad:
        k = bad[0]
        raise ConfigError(f"{_flag(k)} cannot change on --resume (the run has {saved.get(k)!r}, the command "
                          f"{asked[k]!r}; the continuation would not be exact); changeable: "
                          f"{', '.join(_flag(k) for k in RESUMABLE)}")
    return config_from_dict({**saved, **{k: asked[k] for k in changed}}, where)


def check_resume_length(progress: dict[str, Any], cfg: TrainConfig, where: str) -> None:
    """An unfinished run resumes only with more epochs than it has started: fewer would train an epoch of no
    steps, or finish one past the end of its schedule. A run of ``max_steps`` (a budget's plan) ends at its step
    count, whatever ``epochs`` says."""
    total, started = cfg.epochs + cfg.cooldown_epochs, progress.get("epoch", 0) + 1
    if cfg.max_steps is None and not progress.get("finished") and total < started:
        raise ConfigError(f"{where} has done {started - 1} epoch(s) and is not finished: --epochs (plus "
                          f"cooldown_epochs) must be at least {started} to continue it, got {total}")


def _flag(key: str) -> str:
    """The command-line flag of a config key (mappings are given one ``KEY=VALUE`` at a time)."""
    return {"model_args": "--model-arg", "teacher_args": "--teacher-arg"}.get(key, "--" + key.replace("_", "-"))
