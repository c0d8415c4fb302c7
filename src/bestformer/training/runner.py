"""Training runs from a config: data, teacher, student, the loop, the final test; ``bestformer train`` calls
:func:`train` and :func:`resume`.

A run: build the dataset bundle; fill every model's ``num_classes`` / ``in_channels`` / ``img_size`` from it
(and ``time_steps``: the frames of event data, else ``--time-steps`` or the model's default); obtain the
teacher (a checkpoint, or a registered architecture trained first in ``<run>/teacher``, then frozen); build
the student; train with model selection on the validation split; evaluate the best weights once on the test
split. Seeds are reset before each model is built, so the student starts from the same weights whether its
teacher was trained in this process or loaded from disk (which exact resume needs).

Under torchrun every process runs the same code (ours, docs/distributed.md): :func:`train` / :func:`resume` join
the process group of torchrun's environment and leave it at the end and on error; rank 0 names the run folder
(broadcast) and is the only writer; a teacher named by architecture is trained first by all ranks together, the
same distributed way as the student (no rank idles, and no rank waits at a collective for hours while rank 0
trains alone, which the collective timeout would end), then rank 0 reads its best weights and broadcasts them;
a resumed run keeps its global batch on another number of processes (:func:`~.distributed.replan_batches`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import platform
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..errors import BestformerError, ConfigError, InputError, close_matches
from ..fileio import read_json
from ..models import create_model, get_input_config, is_model
from ..neurons import set_backend, supported_backends
from ..quant import weight_bits_of
from .budget import parse_duration, plan_budget
from .checkpoint import check_fits, load_checkpoint, load_weights
from .config import TrainConfig, config_from_dict, list_recipes, load_recipe, with_recipe
from .distill import Distiller, get_distiller, list_distillers
from .distributed import (
    DistContext,
    broadcast_module,
    broadcast_object,
    distributed,
    replan_batches,
    resolve_device,
    timeout_from_env,
)
from .engine import Trainer, _log, evaluate
from .runs import RunFolder, default_run_name, resolve_run_folder
from .state import load_resume_state

#: distillers that live in modules imported only when chosen
LAZY_DISTILLERS = {"fgd": "bestformer.training.fgd"}
#: seconds set aside after training for the profile written beside the checkpoints
PROFILE_SECONDS = 10.0
#: options that may change on resume: the run's length, its checkpointing and where / how fast it executes (another
#: device or thread count can change float rounding); the others define the experiment and must stay
RESUMABLE = ("epochs", "cooldown_epochs", "patience", "ckpt_every_steps", "monitor_every", "skip_nonfinite",
             "device", "workers", "threads", "neuron_backend", "channels_last", "sync_bn", "data_dir", "download",
             "log")
DATA_FIELDS = ("num_classes", "in_channels", "img_size", "time_steps")
#: options that a resume on another number of processes adjusts (keeping batch_size x accum_steps x processes)
BATCH_LAYOUT = ("batch_size", "accum_steps")


def distill_choices() -> list[str]:
    return ["none", *dict.fromkeys([*list_distillers(), *LAZY_DISTILLERS])]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(1-bit weights, full-precision parameters)`` of a model."""
    one_bit = sum(m.weight.numel() for m in model.modules() if weight_bits_of(m) == 1)
    return one_bit, sum(p.numel() for p in model.parameters()) - one_bit


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


def choose_backend(name: str | None) -> str:
    """The LIF backend: ``name``, else ``"fused"`` when registered, else ``"plain"``."""
    name = name or ("fused" if "fused" in supported_backends() else "plain")
    set_backend(name)
    return name


def model_options(name: str, bundle: Any, time_steps: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Options of model ``name`` for ``bundle``: its data fields from the dataset, then ``extra``."""
    default_t = get_input_config(name).time_steps
    data = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, "img_size": bundle.img_size,
            "time_steps": time_steps or default_t}
    for key in DATA_FIELDS:
        if key in extra and extra[key] != data[key] and not (key == "time_steps" and not bundle.is_event):
            raise ConfigError(f"model option {key}={extra[key]!r} contradicts the dataset {bundle.name} "
                              f"({key}={data[key]}); leave it out, it is filled from the data")
    return {**data, **extra}


def load_bundle(cfg: TrainConfig, time_steps: int) -> Any:
    from ..data import build_datasets

    return build_datasets(cfg.dataset, cfg.data_dir, time_steps=time_steps, split_by=cfg.split_by,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, download=cfg.download, limit=cfg.limit)


def resolve_distill(cfg: TrainConfig) -> str:
    """The distillation of a run (default ``hard`` with a teacher, ``none`` without), checked before any
    training; a distiller living in its own module (``fgd``) is imported only now that it is chosen."""
    name = cfg.distill or ("hard" if cfg.teacher is not None else "none")
    if name == "none":
        if cfg.teacher is not None:
            raise ConfigError("a teacher was given with --distill none; drop --teacher or choose a distillation")
        return name
    if cfg.teacher is None:
        raise ConfigError(f"--distill {name} needs a teacher (--teacher PATH or NAME)")
    if name in LAZY_DISTILLERS and name not in list_distillers():
        try:
            importlib.import_module(LAZY_DISTILLERS[name])
        except ImportError as err:
            raise ConfigError(f"distillation {name!r} is not available in this installation ({err})") from None
    get_distiller(name)  # an unknown name: one line with the registered choices
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


@dataclass
class TrainResult:
    """What a run produced. ``status``: ``"finished"``, ``"stopped_early"`` or ``"interrupted"``."""

    run_dir: Path
    status: str
    model_name: str
    epochs_done: int
    best_epoch: int | None = None
    val: dict[str, float] | None = None
    test: dict[str, float] | None = None
    params: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    teacher: TrainResult | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None  #: the signal of an interrupted run (SIGINT or SIGTERM)

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0, or 128 + the signal number after an interruption (130 / 143)."""
        if self.status != "interrupted":
            return 0
        return 128 + int(getattr(signal, self.stopped_by or "SIGTERM", signal.SIGTERM))

    @classmethod
    def from_summary(cls, summary: dict[str, Any], history: list[dict[str, Any]]) -> TrainResult:
        """The result of a finished run from its ``summary.json``."""
        teacher = summary.get("teacher")
        return cls(Path(summary["run_dir"]), summary["status"], summary["model_name"], summary["epochs_done"],
                   summary.get("best_epoch"), summary.get("val"), summary.get("test"),
                   (summary["one_bit_params"], summary["full_precision_params"]), summary.get("seconds", 0.0),
                   cls.from_summary(teacher, []) if teacher else None, history)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("teacher", "history", "run_dir", "stopped_by")}
        out["run_dir"] = str(self.run_dir)
        out["one_bit_params"], out["full_precision_params"] = out.pop("params")
        if self.teacher is not None:
            out["teacher"] = self.teacher.summary()
        return out


class _Run:
    """One training run in ``folder`` (a teacher run is another ``_Run`` in ``folder/teacher``)."""

    def __init__(self, cfg: TrainConfig, folder: RunFolder, ctx: DistContext, recipe: str | None,
                 role: str = "model", started: float | None = None) -> None:
        self.cfg, self.folder, self.ctx, self.recipe, self.role = cfg, folder, ctx, recipe, role
        self.started = time.perf_counter() if started is None else started  # a time budget counts from here

    def execute(self, bundle: Any = None) -> TrainResult:
        cfg, folder, ctx = self.cfg, self.folder, self.ctx
        t0 = time.perf_counter()
        state = load_resume_state(folder.resume_path) if _agreed_checkpoint(folder) else None
        if state is not None:
            _check_same_run(state.progress, cfg, folder)
            p, summary = state.progress, folder.path / "summary.json"
            done = p.get("finished") and summary.is_file() and (
                p.get("stopped_early") or p.get("epoch", 0) >= cfg.epochs + cfg.cooldown_epochs)
            # rank 0's verdict and summary for every rank (only it is sure to see the run folder's latest files)
            final = broadcast_object(read_json(summary, "run summary") if done and ctx.is_main else None)
            if final is not None:
                _log(ctx, f"{folder.path} has already finished")
                return TrainResult.from_summary(final, p.get("history", []))
            cfg = self.cfg = _keep_global_batch(cfg, state.progress, ctx)
        if cfg.cuda_batch_size is not None and ctx.device.type == "cuda" and cfg.batch_size != cfg.cuda_batch_size:
            cfg = self.cfg = cfg.replace(batch_size=cfg.cuda_batch_size)  # the recipe's GPU size (lr_scaling follows)
        time_steps = cfg.time_steps or get_input_config(cfg.model).time_steps  # also: an unknown model fails here
        folder.prepare()  # a read-only or missing folder fails now, before the data are read
        if cfg.log == "tensorboard" and folder.enabled:
            from .tensorboard import TensorBoardLog

            folder.tensorboard = TensorBoardLog(folder.path / "tensorboard")
        try:
            return self._execute(cfg, folder, ctx, state, t0, bundle, time_steps)
        finally:
            if folder.tensorboard is not None:
                folder.tensorboard.close()

    def _execute(self, cfg: TrainConfig, folder: RunFolder, ctx: DistContext, state: Any, t0: float,
                 bundle: Any, time_steps: int) -> TrainResult:
        if cfg.threads is not None:  # torch's kernels and the fused LIF kernels' thread pool follow it
            torch.set_num_threads(cfg.threads)
        backend = choose_backend(cfg.neuron_backend)
        if bundle is None:
            bundle = load_bundle(cfg, time_steps)
            _log(ctx, f"data: {bundle.describe()}")
        if len(bundle.train) == 0:
            raise InputError(f"{bundle.name}: the training split is empty")
        if cfg.rand_augment and bundle.is_event:
            raise ConfigError(f"rand_augment works on static images; {bundle.name} has event frames (set it to null)")
        info = {"recipe": self.recipe, "role": self.role, "world_size": ctx.world_size,
                "global_batch": cfg.batch_size * cfg.accum_steps * ctx.world_size, "device": str(ctx.device),
                "neuron_backend": backend, "library_version": __version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "dataset": bundle.describe()}
        folder.write_config(cfg.to_dict(), info)

        distill = resolve_distill(cfg)
        teacher_result, teacher = None, None
        if cfg.teacher is not None:
            teacher, teacher_result = self._teacher(bundle, time_steps)
            if teacher_result is not None and teacher_result.status == "interrupted":
                return TrainResult(folder.path, "interrupted", cfg.model, 0, teacher=teacher_result,
                                   stopped_by=teacher_result.stopped_by)

        seed_everything(cfg.seed, cfg.deterministic)
        student = create_model(cfg.model, **model_options(cfg.model, bundle, time_steps, cfg.model_args))
        if cfg.init is not None and state is None:  # fine-tuning starts from these weights (a resume has its own)
            source = _shared_checkpoint(cfg.init, ctx)
            check_fits(student, source.state_dict(), f"--init {cfg.init} ({source.model_name})")
            student.load_state_dict(source.state_dict())
            _log(ctx, f"initialised from {cfg.init}")
        distiller = None if teacher is None else make_distiller(distill, teacher, student, cfg.label_smoothing)
        extra = {"recipe": self.recipe, "dataset": cfg.dataset, "distill": distill, "role": self.role}
        trainer = Trainer(student, cfg, bundle.train, bundle.val, num_classes=bundle.num_classes, run=folder,
                          distiller=distiller, ctx=ctx, config_extra=extra, mean=bundle.mean, std=bundle.std)
        if state is not None:
            trainer.load_state(state)
            p = trainer.progress
            if not p.finished:
                _log(ctx, f"resuming {folder.path} at epoch {p.epoch + 1}, step {p.global_step} "
                          f"({p.samples_seen} samples seen)")
        trainer.clock0 = self.started
        if cfg.time_budget is not None and state is None:
            cfg = self.cfg = self._plan_budget(trainer, bundle, info)
        p = trainer.progress
        if p.finished and p.epoch < trainer.schedule.total_epochs and not p.stopped_early:
            p.finished = False  # more epochs were asked for on resume
        name = "teacher" if self.role == "teacher" else cfg.model
        _log(ctx, f"training {name} ({cfg.model}) for {trainer.schedule.total_epochs} epochs, "
                  f"{trainer.sampler.steps_per_epoch} steps each, global batch {trainer.global_batch}, "
                  f"on {ctx.device} (neuron backend {backend}) -> {folder.path}")
        status = trainer.fit() if not p.finished else ("stopped_early" if p.stopped_early else "finished")
        result = TrainResult(folder.path, status, cfg.model, p.epoch, p.best_epoch, teacher=teacher_result,
                             params=parameter_counts(student), history=p.history, stopped_by=trainer.stopped_by)
        if status == "interrupted":
            return result
        # the best weights, evaluated once on validation (for the table) and on the test split
        _load_on_main(ctx, lambda: load_weights(student, folder.weights_path("best")))
        broadcast_module(student)
        kw = dict(num_classes=bundle.num_classes, batch_size=cfg.batch_size, ctx=ctx, amp=cfg.amp,
                  workers=cfg.workers, flip=cfg.eval_flip)
        best = next((row for row in p.history if row["epoch"] == p.best_epoch), None)
        if bundle.val is not None and best is not None and math.isfinite(best["val_acc"]):
            # the best weights were validated at the end of their epoch (the history holds it): no second pass
            result.val = {"loss": best["val_loss"], "acc1": best["val_acc"], "acc5": best["val_top5"],
                          "count": len(bundle.val)}
        elif bundle.val is not None:
            result.val = evaluate(trainer.model, bundle.val, desc="validate (best)", where="validation split", **kw)
        if bundle.test is not None:
            result.test = evaluate(trainer.model, bundle.test, desc="test", where="test split", **kw)
        result.seconds = time.perf_counter() - t0
        folder.write_summary(result.summary())
        if self.role == "model" and ctx.is_main:
            _log(ctx, write_profile(student, bundle, folder.path / "profile.json"))
            if folder.tensorboard is not None and (folder.path / "profile.json").is_file():
                folder.tensorboard.profile(read_json(folder.path / "profile.json", "profile"))
        return result

    def _plan_budget(self, trainer: Trainer, bundle: Any, info: dict[str, Any]) -> TrainConfig:
        """Measure this machine's step and validation times, then fix ``max_steps`` so that the run ends within
        ``time_budget`` (counted from the start of the run, teacher included); records the plan in
        ``config.yaml`` / ``run.json`` and arms the trainer's deadline."""
        cfg = self.cfg
        budget = parse_duration(str(cfg.time_budget))
        if bundle.is_event and cfg.time_step_schedule:
            raise ConfigError("time_step_schedule works on static images; event frames fix T")
        # every rank must plan the same step count: rank 0's measurement counts
        step_s, eval_s = broadcast_object(trainer.measure_costs())
        test_s = eval_s * len(bundle.test) / max(len(bundle.val), 1) if bundle.test is not None and bundle.val \
            else 0.0
        final_s = test_s + PROFILE_SECONDS  # the best epoch's validation is reused, not repeated
        plan = plan_budget(budget, time.perf_counter() - self.started, step_s,
                           trainer.planned_schedule,
                           trainer.sampler.steps_per_epoch, eval_s, final_s)
        cfg = cfg.replace(max_steps=plan.total_steps)
        trainer.cfg = cfg
        trainer.set_max_steps(plan.total_steps)
        trainer.deadline = self.started + budget - final_s
        trainer.plan, trainer.plan_end = plan, trainer.deadline - plan.reserve_s
        self.folder.write_config(cfg.to_dict(), {**info, "budget_plan": plan.to_dict()})
        _log(self.ctx, plan.describe())
        return cfg

    def _teacher(self, bundle: Any, time_steps: int) -> tuple[nn.Module, TrainResult | None]:
        """The frozen teacher: a checkpoint, or a registered architecture trained in ``<run>/teacher``."""
        cfg = self.cfg
        spec = str(cfg.teacher)
        path = Path(spec)
        if path.suffix == ".safetensors" or path.is_file() or spec.startswith("zoo:"):
            teacher = _shared_checkpoint(spec, self.ctx)
            _check_teacher_fits(teacher, bundle, path)
            _log(self.ctx, f"teacher: {teacher.model_name} from {path}")
            return teacher, None
        if not is_model(spec):
            from ..models import list_models

            raise ConfigError(f"--teacher {spec!r} is neither a checkpoint file nor a model name"
                              f"{close_matches(spec, list_models())}")
        epochs = cfg.teacher_epochs or cfg.epochs
        tcfg = cfg.replace(model=spec, model_args=dict(cfg.teacher_args), epochs=epochs,
                           lr=cfg.teacher_lr or cfg.lr, teacher=None, distill=None, teacher_args={},
                           teacher_epochs=None, teacher_lr=None, time_steps=time_steps if bundle.is_event else None,
                           cooldown_epochs=0, warmup_epochs=min(cfg.warmup_epochs, epochs), time_budget=None,
                           max_steps=None, time_step_schedule=None, init=None)
        run = _Run(tcfg, self.folder.teacher, self.ctx, self.recipe, role="teacher", started=self.started)
        result = run.execute(bundle)
        if result.status == "interrupted":
            return nn.Identity(), result
        return _shared_checkpoint(self.folder.teacher.weights_path("best"), self.ctx), result


def write_profile(model: nn.Module, bundle: Any, path: Path, batches: int = 4) -> str:
    """Issue 4: size, SOPs, energy and NS-ACE of the trained model, measured on a few held-out batches of
    ``bundle`` and written as JSON to ``path`` (``profile.json`` beside a run's checkpoints); returns the line of
    totals to print (a line saying why, and no file, when it cannot be measured)."""
    from ..analysis import profile_model
    from ..data import time_first

    which, split = ("validation", bundle.val) if bundle.val is not None else ("test", bundle.test)
    if split is None:
        return "profile: skipped (no held-out split to measure firing rates on)"
    loader = DataLoader(split, batch_size=16, shuffle=False)
    try:
        prof = profile_model(model, (time_first(x) for x, _ in loader), batches=batches,
                             measured_on=f"{bundle.name} ({which})", progress=False)
    except BestformerError as err:
        return f"profile: skipped ({err})"
    prof.to_json(path)
    return f"profile ({path}): {prof.summary()}"


def _check_teacher_fits(teacher: nn.Module, bundle: Any, path: Path) -> None:
    for key, want in (("num_classes", bundle.num_classes), ("in_channels", bundle.in_channels),
                      ("img_size", bundle.img_size)):
        have = getattr(teacher, key, want)
        if have != want:
            raise ConfigError(f"teacher {path} has {key}={have} but the dataset {bundle.name} needs {want}; "
                              "train the teacher on the same dataset")


def _check_same_run(progress: dict[str, Any], cfg: TrainConfig, folder: RunFolder) -> None:
    saved = progress.get("config", {})
    # the per-process layout follows the number of processes (a teacher's is derived from its student's): what
    # must stay is the global batch, which _keep_global_batch and Trainer.load_state check
    changed = [k for k in saved if k not in (*RESUMABLE, *BATCH_LAYOUT) and saved.get(k) != cfg.to_dict().get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"{folder.resume_path} was trained with {k}={saved[k]!r}, not {getattr(cfg, k)!r}: "
                          f"only {', '.join(RESUMABLE)} may change on --resume")


def _load_on_main(ctx: DistContext, load: Callable[[], Any]) -> Any:
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


def load_weights_spec(spec: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a checkpoint path or a zoo entry (``zoo:NAME``): ``(model, header or meta)``."""
    if str(spec).startswith("zoo:"):
        from ..zoo import load_pretrained  # the zoo sits above training: imported only when named

        model, header = load_pretrained(str(spec))
        return model, {**header.get("meta", {}), "model_name": header["model_name"],
                       "model_args": header["model_args"]}
    return load_checkpoint(spec)


def saved_model_data(model: nn.Module, meta: dict[str, Any], *, source: str = "the model", dataset: str | None = None,
                     data_dir: str | None = None, limit: int | None = None) -> Any:
    """The dataset a saved model (``load_weights_spec``) was trained on (or ``dataset``), split with its training
    run's seed, val_fraction and event binning: the same validation carve as during training."""
    from ..data import build_datasets

    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    dataset = dataset or meta.get("dataset") or config.get("dataset")
    if not dataset:
        raise ConfigError(f"{source} does not record its dataset; pass --dataset NAME")
    bundle = build_datasets(dataset, data_dir, time_steps=getattr(model, "time_steps", None) or 4,
                            split_by=config.get("split_by", "number"), val_fraction=config.get("val_fraction", 0.1),
                            seed=config.get("seed", 0), limit=limit)
    classes = getattr(model, "num_classes", bundle.num_classes)
    if bundle.num_classes != classes:
        raise InputError(f"{dataset} has {bundle.num_classes} classes but {source} predicts {classes}; evaluate it "
                         "on the dataset it was trained on")
    return bundle


def evaluate_saved(model: nn.Module, meta: dict[str, Any], *, source: str = "the model",
                   dataset: str | None = None, data_dir: str | None = None, split: str = "test",
                   limit: int | None = None, batch_size: int = 256, device: str = "auto", amp: str | None = None,
                   flip: bool | None = None, workers: int = 0) -> dict[str, Any]:
    """Evaluate a saved model (``load_weights_spec``) on a split of its dataset, by default with its training run's
    own evaluation settings (amp, flip TTA) and its seed and val_fraction (the same validation carve as during
    training), so that its recorded accuracy is reproduced. Returns ``evaluate``'s metrics plus ``dataset``,
    ``amp`` and ``flip``."""
    bundle = saved_model_data(model, meta, source=source, dataset=dataset, data_dir=data_dir, limit=limit)
    dataset, config = bundle.name, meta.get("config") if isinstance(meta.get("config"), dict) else {}
    data = getattr(bundle, split)
    if data is None:
        raise ConfigError(f"{dataset} has no {split} split here; choose another --split")
    ctx = DistContext(device=resolve_device(device))
    model.to(ctx.device)
    amp = amp or config.get("amp", "auto")
    flip = bool(config.get("eval_flip", False)) if flip is None else flip
    res = evaluate(model, data, num_classes=bundle.num_classes, batch_size=batch_size, ctx=ctx, amp=amp,
                   workers=workers, desc=f"{dataset} {split}", where=f"{dataset} {split} split", flip=flip)
    return {**res, "dataset": dataset, "amp": amp, "flip": flip}


def _shared_checkpoint(path: str | Path, ctx: DistContext) -> nn.Module:
    """A model checkpoint (or zoo entry) that rank 0 reads; the other ranks build the same architecture and receive
    its weights (so the file need only be on rank 0's file system, and no rank reads it before rank 0 finished
    writing)."""
    loaded = _load_on_main(ctx, lambda: load_weights_spec(path))
    name, args = broadcast_object((loaded[1]["model_name"], loaded[1]["model_args"]) if ctx.is_main else None)
    model = loaded[0] if ctx.is_main else create_model(name, **args)
    return broadcast_module(model)


def _agreed_checkpoint(folder: RunFolder) -> bool:
    """Whether ``folder`` holds a resume state, as rank 0 sees it; every rank must see the same (they all read it)."""
    here = folder.has_checkpoint()
    there = broadcast_object(here)
    if here != there:
        raise ConfigError(f"rank 0 {'finds' if there else 'does not find'} a checkpoint in {folder.path} but this "
                          "rank does not agree: every node must see the run folder (put --out on a shared file "
                          "system)")
    return here


def _keep_global_batch(cfg: TrainConfig, progress: dict[str, Any], ctx: DistContext) -> TrainConfig:
    """On resume, the run's global batch on this run's number of processes (see
    :func:`~.distributed.replan_batches`); the batch size and accumulation are adjusted, and recorded."""
    saved = progress.get("global_batch")
    if saved is None or saved == cfg.batch_size * cfg.accum_steps * ctx.world_size:
        return cfg
    plan = replan_batches(saved, ctx.world_size, cfg.batch_size)
    _log(ctx, f"resuming on {ctx.world_size} process(es) instead of {progress.get('world_size')}: global batch "
              f"{saved} kept as batch size {plan.batch_size} x accumulation {plan.accum_steps} x "
              f"{ctx.world_size} process(es)")
    return cfg.replace(batch_size=plan.batch_size, accum_steps=plan.accum_steps)


def _session(cfg: TrainConfig, ctx: DistContext | None) -> contextlib.AbstractContextManager[DistContext]:
    """The given context, else the process group of torchrun's environment (joined now, left at the end and on
    error; backend failures become :class:`~.distributed.DistributedError`), else a single process."""
    if ctx is not None:
        return contextlib.nullcontext(ctx)
    return distributed(cfg.device, timeout_from_env())


@contextlib.contextmanager
def _locked(folder: RunFolder, ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds the run folder's lock; its refusal is raised on every rank."""
    with contextlib.ExitStack() as stack:
        _load_on_main(ctx, lambda: stack.enter_context(folder.lock()))
        yield


def train(cfg: TrainConfig, *, recipe: str | None = None, ctx: DistContext | None = None) -> TrainResult:
    """Start a new run in ``cfg.out / cfg.name`` (a folder that already holds a checkpoint is refused:
    resume it instead). Under torchrun (no ``ctx`` given) every process calls it; they join the process group,
    rank 0 names the run folder and writes it."""
    with _session(cfg, ctx) as ctx:
        name = broadcast_object(cfg.name or default_run_name(cfg.model, cfg.dataset))
        folder = RunFolder(Path(cfg.out) / name, enabled=ctx.is_main)
        with _locked(folder, ctx):
            if broadcast_object(folder.has_checkpoint()):
                raise ConfigError(f"run folder {folder.path} already holds a checkpoint: continue it with --resume "
                                  f"{folder.path}, or choose another --name")
            if cfg.name is None:
                cfg = cfg.replace(name=name)
            return _Run(cfg, folder, ctx, recipe).execute()


def resume(spec: str | os.PathLike[str], out: str | os.PathLike[str] = "runs", *, ctx: DistContext | None = None,
           recipe: str | None = None, **overrides: Any) -> TrainResult:
    """Continue the run ``spec`` (a run folder, a file in it, or ``"last"``) exactly where its last complete
    checkpoint left it. ``overrides`` (and ``recipe``: the original command's ``--recipe``) may repeat the run's
    own options; only the options in :data:`RESUMABLE` may take another value. A folder without a checkpoint yet
    (a run killed during start-up) starts from the beginning with its saved config."""
    folder = resolve_run_folder(spec, out)
    if folder.has_checkpoint():
        saved = load_resume_state(folder.resume_path).progress.get("config")
    else:
        saved = load_recipe(str(folder.config_path))
    if recipe is None and overrides.get("dataset") in list_recipes():
        recipe = overrides["dataset"]  # as resolve_config picks it for a command without --recipe
    # the original command repeated: its recipe's values count as given (without one, only the options given)
    given = with_recipe(None if recipe is None or recipe.lower() == "none" else recipe, overrides)
    asked = config_from_dict({**saved, **given}, "options").to_dict()
    # a run on CUDA trained at its recipe's cuda_batch_size: the recipe's CPU batch_size repeated is no change
    on_cuda = saved.get("cuda_batch_size") is not None and saved.get("batch_size") == saved.get("cuda_batch_size")
    changed = [k for k in given if asked[k] != saved.get(k) and not (k == "batch_size" and on_cuda)]
    bad = [k for k in changed if k not in RESUMABLE]
    if bad:
        k = bad[0]
        raise ConfigError(f"--{k.replace('_', '-')} cannot change on --resume (the run has {saved.get(k)!r}, the "
                          f"command {asked[k]!r}; the continuation would not be exact); changeable: "
                          f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}")
    cfg = config_from_dict({**saved, **{k: asked[k] for k in changed}}, f"run {folder.path}")
    info = read_json(folder.path / "run.json", "run description") if (folder.path / "run.json").is_file() else {}
    with _session(cfg, ctx) as ctx:
        folder.enabled = ctx.is_main
        with _locked(folder, ctx):
            return _Run(cfg, folder, ctx, info.get("recipe")).execute()


def results_table(result: TrainResult) -> str:
    """The short table printed at the end of ``bestformer train``."""
    rows = [("model", "role", "val acc", "test acc", "1-bit params", "full-precision params")]

    def acc(metrics: dict[str, float] | None) -> str:
        return f"{metrics['acc1']:.2f}%" if metrics else "-"

    def fmt(r: TrainResult, role: str) -> tuple[str, ...]:
        return (r.model_name, role, acc(r.val), acc(r.test), f"{r.params[0]:,}", f"{r.params[1]:,}")

    if result.teacher is not None:
        rows.append(fmt(result.teacher, "teacher"))
    rows.append(fmt(result, "student" if result.teacher is not None else "model"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
