"""The groups of a training config (:class:`~.config.TrainConfig`): data, architecture, optimizer, schedule,
augmentation, distillation and runtime, each a frozen dataclass.

Every field is also a flat recipe key and command-line option (``lr`` -> ``--lr``; ``cfg.lr`` reads
``cfg.optim.lr``): the grouping is internal structure, the flat names are the public surface. The field order
inside each group is the order of ``bestformer train --help`` and of a run's ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(help_: str, choices: tuple[str, ...] | None = None, cli: bool = True) -> dict[str, Any]:
    return {"help": help_, "choices": choices, "cli": cli}


@dataclass(frozen=True)
class ArchConfig:
    """The model trained (group ``arch``: ``model`` itself is the flat name of the model)."""

    model: str = field(default="bestformer_tiny", metadata=_opt("registered model name (bestformer.list_models())"))
    model_args: dict = field(default_factory=dict, metadata=_opt(
        "extra model options (YAML mapping; on the command line --model-arg KEY=VALUE, repeatable)", cli=False))
    init: str | None = field(default=None, metadata=_opt(
        "start from these weights (fine-tuning): a checkpoint path or zoo:NAME (bestformer zoo); the model and its "
        "options must match"))


@dataclass(frozen=True)
class DataConfig:
    """The dataset and its splits."""

    dataset: str = field(default="digits", metadata=_opt("dataset name (bestformer.data.list_datasets())"))
    data_dir: str | None = field(default=None, metadata=_opt("folder of the dataset files"))
    download: bool = field(default=False, metadata=_opt("download the dataset when missing (needs network)"))
    limit: int | None = field(default=None, metadata=_opt("use at most this many samples per split (quick runs)"))
    val_fraction: float = field(default=0.1, metadata=_opt("fraction of the training split held out for validation"))
    split_by: str = field(default="number", metadata=_opt("event binning into frames", ("number", "time")))
    time_steps: int | None = field(default=None, metadata=_opt(
        "time steps T (event datasets: frames); default: the model's"))


@dataclass(frozen=True)
class ScheduleConfig:
    """The run's length and learning-rate schedule (``epochs`` counts the cosine part, warm-up included;
    ``cooldown_epochs`` more run at ``min_lr``, timm's convention)."""

    epochs: int = field(default=10, metadata=_opt("epochs of the cosine schedule (warm-up included)"))
    cooldown_epochs: int = field(default=0, metadata=_opt("extra epochs at min_lr after the cosine schedule"))
    warmup_epochs: float = field(default=0.0, metadata=_opt("warm-up epochs, warmup_lr to lr (may be fractional)"))
    warmup_lr: float = field(default=1e-5, metadata=_opt("learning rate at the start of the warm-up"))
    warmup_prefix: bool = field(default=True, metadata=_opt(
        "start the cosine at the end of the warm-up (timm's warmup_prefix=True); false: the cosine spans the whole "
        "run, warm-up included (timm's default, the reference recipes')"))
    min_lr: float = field(default=1e-5, metadata=_opt("learning rate at the end of the cosine and in cool-down"))
    time_budget: str | None = field(default=None, metadata=_opt(
        "wall-clock budget of the whole run, e.g. 60m, 1.5h, 900s (data, teacher and evaluations included): the "
        "step count is planned from the measured step time so that the schedule ends with the budget"))
    max_steps: int | None = field(default=None, metadata=_opt(
        "optimizer steps of the run; the cosine schedule ends there (default: epochs; --time-budget plans it)"))
    time_step_schedule: str | None = field(default=None, metadata=_opt(
        "train static images at fewer time steps first, as T:fraction pairs of the steps, e.g. 1:0.6,4:0.4 "
        "(the last T is the model's; evaluation always uses it)"))
    patience: int = field(default=0, metadata=_opt(
        "stop after this many epochs without a better validation accuracy (0: never)"))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, the batch and its precision."""

    lr: float = field(default=1e-3, metadata=_opt("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.05, metadata=_opt("AdamW weight decay (not on norms, biases, lambda)"))
    batch_size: int = field(default=64, metadata=_opt("samples per step and process"))
    accum_steps: int = field(default=1, metadata=_opt("gradient accumulation: micro-batches per optimizer step"))
    cuda_batch_size: int | None = field(default=None, metadata=_opt(
        "batch_size to use instead when the device is CUDA (a recipe's GPU size; the lr follows lr_scaling)"))
    lr_scaling: str = field(default="none", metadata=_opt(
        "scale lr and warmup_lr with the global batch: linear or sqrt of global batch / lr_base_batch",
        ("none", "linear", "sqrt")))
    lr_base_batch: int = field(default=128, metadata=_opt("the global batch at which lr is given (lr_scaling)"))
    clip_grad: float | None = field(default=None, metadata=_opt("clip the gradient norm to this value"))
    label_smoothing: float = field(default=0.1, metadata=_opt("label smoothing of the cross-entropy"))
    amp: str = field(default="auto", metadata=_opt(
        "mixed precision: auto (bf16 on CUDA, off on CPU), fast (bf16 on CUDA and on CPUs with native bf16), bf16, "
        "fp16 (with loss scaling) or off", ("auto", "fast", "bf16", "fp16", "off")))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (and the test-time flip)."""

    mixup: float = field(default=0.0, metadata=_opt("mixup alpha (0: off)"))
    cutmix: float = field(default=0.0, metadata=_opt("cutmix alpha (0: off)"))
    mixup_prob: float = field(default=1.0, metadata=_opt("probability of mixing a batch when mixup/cutmix are on"))
    mixup_switch_prob: float = field(default=0.5, metadata=_opt("probability of cutmix when both are on"))
    mixup_off_epoch: int = field(default=0, metadata=_opt("turn mixup/cutmix off from this epoch on (0: never)"))
    crop_padding: int = field(default=0, metadata=_opt("random crop after zero padding by this many pixels"))
    flip: float = field(default=0.0, metadata=_opt("probability of a horizontal flip"))
    random_erasing: float = field(default=0.0, metadata=_opt("probability of erasing a random rectangle"))
    rand_augment: str | None = field(default=None, metadata=_opt(
        "RandAugment as timm's spec string, e.g. m9-n1-mstd0.4-inc1 (static images only; default: off)"))
    eval_flip: bool = field(default=False, metadata=_opt(
        "test-time augmentation: average the logits of each image and its horizontal mirror"))


@dataclass(frozen=True)
class DistillConfig:
    """The teacher and the distillation objective (group ``distillation``: ``distill`` is the objective's flat
    name)."""

    teacher: str | None = field(default=None, metadata=_opt(
        "distillation teacher: a checkpoint path or a model name trained first in this run"))
    teacher_args: dict = field(default_factory=dict, metadata=_opt(
        "extra options of a teacher trained in this run (YAML mapping; --teacher-arg KEY=VALUE)", cli=False))
    teacher_epochs: int | None = field(default=None, metadata=_opt(
        "epochs of a teacher trained first (default: epochs)"))
    teacher_lr: float | None = field(default=None, metadata=_opt("learning rate of that teacher (default: lr)"))
    distill: str | None = field(default=None, metadata=_opt(
        "distillation objective (default: hard with a teacher, none without)"))


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes, and what it writes: none of it changes the experiment except ``seed``."""

    seed: int = field(default=0, metadata=_opt("random seed (initialisation, data order, augmentation)"))
    deterministic: bool = field(default=False, metadata=_opt(
        "deterministic algorithms only (bit-identical reruns and resumes)"))
    device: str = field(default="auto", metadata=_opt("cpu, cuda, cuda:N or auto"))
    workers: int = field(default=0, metadata=_opt("data-loading worker processes"))
    threads: int | None = field(default=None, metadata=_opt(
        "CPU threads of torch and of the fused neuron kernels; default: torch's choice"))
    out: str = field(default="runs", metadata=_opt("root folder of the runs"))
    name: str | None = field(default=None, metadata=_opt("run folder name (default: <time>-<model>-<dataset>)"))
    log: str = field(default="csv", metadata=_opt(
        "logs of the run: csv (metrics.csv, curves.png) or tensorboard (the same, plus TensorBoard event files in "
        "<run>/tensorboard; needs the tensorboard extra)", choices=("csv", "tensorboard")))
    ckpt_every_steps: int = field(default=0, metadata=_opt(
        "also checkpoint every N optimizer steps (0: at the end of each epoch only)"))
    monitor_every: int = field(default=25, metadata=_opt(
        "sample per-layer firing rates every N steps (0: off)"))
    skip_nonfinite: int = field(default=0, metadata=_opt(
        "skip up to N steps with a NaN/inf loss or gradient instead of stopping"))
    neuron_backend: str | None = field(default=None, metadata=_opt(
        "LIF implementation: plain or fused (default: fused when available)"))
    channels_last: bool = field(default=True, metadata=_opt(
        "on CPU, keep convolution weights and activations channels-last (oneDNN's faster layout)"))
    sync_bn: bool = field(default=False, metadata=_opt(
        "with several processes, BatchNorm statistics over the micro-batches of all ranks (SyncBatchNorm)"))
    grad_checkpointing: bool = field(default=False, metadata=_opt(
        "recompute each block in backward instead of keeping its activations (less memory, each block's forward "
        "runs twice; bit-identical gradients)"))


#: group attribute of :class:`~.config.TrainConfig` -> its dataclass (the order of ``to_dict`` and ``--help``)
GROUPS: dict[str, type] = {"arch": ArchConfig, "data": DataConfig, "schedule": ScheduleConfig, "optim": OptimConfig,
                           "augment": AugmentConfig, "distillation": DistillConfig, "runtime": RuntimeConfig}
