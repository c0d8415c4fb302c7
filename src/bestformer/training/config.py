"""Training configuration: one typed dataclass, YAML recipes and command-line overrides.

Every field of :class:`TrainConfig` is a recipe key (YAML) and a command-line option (``batch_size`` ->
``--batch-size``). A recipe is applied over the defaults and the command line over the recipe, so every
recipe field can be overridden. Recipes with an unknown key or a value of the wrong type are refused with
one line naming the key and the expected type.

Recipes ship in ``bestformer/recipes/*.yaml``: ``digits`` (the README demo, tuned by us on real runs),
``mnist`` and ``nmnist`` (ours), and ``cifar10``, ``cifar100``, ``imagenet``, ``cifar10dvs`` mirroring the
BESTformer reference recipes (SPEC.md; where the paper or its code is silent the YAML says which values are
ours).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, close_matches
from .budget import parse_duration, parse_time_step_schedule
from .randaugment import parse_spec

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _opt(help_: str, choices: tuple[str, ...] | None = None, cli: bool = True) -> dict[str, Any]:
    return {"help": help_, "choices": choices, "cli": cli}


@dataclass
class TrainConfig:
    """Every option of a training run (recipe keys and ``bestformer train`` options).

    The defaults are generic; the recipes (``bestformer/recipes/*.yaml``) set up each dataset.
    ``epochs`` counts the cosine part (warm-up included); ``cooldown_epochs`` more epochs run at ``min_lr``
    after it (timm's convention), so a run lasts ``epochs + cooldown_epochs`` epochs.
    """

    # model and data
    model: str = field(default="bestformer_tiny", metadata=_opt("registered model name (bestformer.list_models())"))
    model_args: dict = field(default_factory=dict, metadata=_opt(
        "extra model options (YAML mapping; on the command line --model-arg KEY=VALUE, repeatable)", cli=False))
    dataset: str = field(default="digits", metadata=_opt("dataset name (bestformer.data.list_datasets())"))
    data_dir: str | None = field(default=None, metadata=_opt("folder of the dataset files"))
    download: bool = field(default=False, metadata=_opt("download the dataset when missing (needs network)"))
    limit: int | None = field(default=None, metadata=_opt("use at most this many samples per split (quick runs)"))
    val_fraction: float = field(default=0.1, metadata=_opt("fraction of the training split held out for validation"))
    split_by: str = field(default="number", metadata=_opt("event binning into frames", ("number", "time")))
    time_steps: int | None = field(default=None, metadata=_opt(
        "time steps T (event datasets: frames); default: the model's"))
    # optimisation
    epochs: int = field(default=10, metadata=_opt("epochs of the cosine schedule (warm-up included)"))
    cooldown_epochs: int = field(default=0, metadata=_opt("extra epochs at min_lr after the cosine schedule"))
    warmup_epochs: float = field(default=0.0, metadata=_opt("warm-up epochs, warmup_lr to lr (may be fractional)"))
    lr: float = field(default=1e-3, metadata=_opt("peak learning rate (AdamW)"))
    warmup_lr: float = field(default=1e-5, metadata=_opt("learning rate at the start of the warm-up"))
    min_lr: float = field(default=1e-5, metadata=_opt("learning rate at the end of the cosine and in cool-down"))
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
    amp: str = field(default="auto", metadata=_opt(
        "mixed precision: auto (bf16 on CUDA, off on CPU), fast (bf16 on CUDA and on CPUs with native bf16), bf16, "
        "fp16 (with loss scaling) or off", ("auto", "fast", "bf16", "fp16", "off")))
    seed: int = field(default=0, metadata=_opt("random seed (initialisation, data order, augmentation)"))
    deterministic: bool = field(default=False, metadata=_opt(
        "deterministic algorithms only (bit-identical reruns and resumes)"))
    device: str = field(default="auto", metadata=_opt("cpu, cuda, cuda:N or auto"))
    workers: int = field(default=0, metadata=_opt("data-loading worker processes"))
    threads: int | None = field(default=None, metadata=_opt(
        "CPU threads of torch and of the fused neuron kernels; default: torch's choice"))
    time_budget: str | None = field(default=None, metadata=_opt(
        "wall-clock budget of the whole run, e.g. 60m, 1.5h, 900s (data, teacher and evaluations included): the "
        "step count is planned from the measured step time so that the schedule ends with the budget"))
    max_steps: int | None = field(default=None, metadata=_opt(
        "optimizer steps of the run; the cosine schedule ends there (default: epochs; --time-budget plans it)"))
    time_step_schedule: str | None = field(default=None, metadata=_opt(
        "train static images at fewer time steps first, as T:fraction pairs of the steps, e.g. 1:0.6,4:0.4 "
        "(the last T is the model's; evaluation always uses it)"))
    eval_flip: bool = field(default=False, metadata=_opt(
        "test-time augmentation: average the logits of each image and its horizontal mirror"))
    patience: int = field(default=0, metadata=_opt(
        "stop after this many epochs without a better validation accuracy (0: never)"))
    # distillation
    teacher: str | None = field(default=None, metadata=_opt(
        "distillation teacher: a checkpoint path or a model name trained first in this run"))
    init: str | None = field(default=None, metadata=_opt(
        "start from these weights (fine-tuning): a checkpoint path or zoo:NAME (bestformer zoo); the model and its "
        "options must match"))
    teacher_args: dict = field(default_factory=dict, metadata=_opt(
        "extra options of a teacher trained in this run (YAML mapping; --teacher-arg KEY=VALUE)", cli=False))
    teacher_epochs: int | None = field(default=None, metadata=_opt(
        "epochs of a teacher trained first (default: epochs)"))
    teacher_lr: float | None = field(default=None, metadata=_opt("learning rate of that teacher (default: lr)"))
    distill: str | None = field(default=None, metadata=_opt(
        "distillation objective (default: hard with a teacher, none without)"))
    # runs, reliability
    out: str = field(default="runs", metadata=_opt("root folder of the runs"))
    name: str | None = field(default=None, metadata=_opt("run folder name (default: <model>-<dataset>-<time>)"))
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Range checks that the types alone do not express; raises :class:`ConfigError`."""
        for key, val in self.to_dict().items():  # NaN passes every comparison below, so refuse it first
            bad = _non_finite(val)
            if bad is not None:
                raise ConfigError(f"{key}{bad} must be a finite number, got {val if not bad else 'nan/inf'}")
        if self.name is not None:
            check_run_name(self.name)
        for key in ("epochs", "batch_size", "accum_steps", "lr_base_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("cooldown_epochs", "warmup_epochs", "crop_padding", "workers", "patience",
                    "ckpt_every_steps", "monitor_every", "skip_nonfinite", "mixup_off_epoch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.time_steps is not None and self.time_steps < 1:
            raise ConfigError(f"time_steps must be >= 1, got {self.time_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.teacher_epochs is not None and self.teacher_epochs < 1:
            raise ConfigError(f"teacher_epochs must be >= 1, got {self.teacher_epochs}")
        for key in ("lr", "warmup_lr", "min_lr", "weight_decay", "mixup", "cutmix"):
            val = getattr(self, key)
            if not math.isfinite(val) or val < 0:
                raise ConfigError(f"{key} must be a finite number >= 0, got {val}")
        if self.lr <= 0 or (self.teacher_lr is not None and self.teacher_lr <= 0):
            raise ConfigError("learning rates must be > 0")
        for key in ("label_smoothing", "mixup_prob", "mixup_switch_prob", "flip", "random_erasing"):
            val = getattr(self, key)
            if not 0.0 <= val <= 1.0:
                raise ConfigError(f"{key} must be a probability in [0, 1], got {val}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"clip_grad must be > 0 (or null for no clipping), got {self.clip_grad}")
        for key, choices in _CHOICES.items():
            val = getattr(self, key)
            if val not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {val!r}")
        if self.rand_augment is not None:
            parse_spec(self.rand_augment)  # a bad spec fails here, in one line
        if self.cuda_batch_size is not None and self.cuda_batch_size < 1:
            raise ConfigError(f"cuda_batch_size must be >= 1, got {self.cuda_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.time_step_schedule is not None:
            parse_time_step_schedule(self.time_step_schedule)
        return self

    def lr_factor(self, global_batch: int) -> float:
        """The factor on ``lr`` and ``warmup_lr`` of :attr:`lr_scaling` at ``global_batch`` (Goyal et al. 2017's
        linear rule, or the square-root rule usual for Adam-type optimizers)."""
        ratio = global_batch / self.lr_base_batch
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (checked like a recipe)."""
        return config_from_dict({**self.to_dict(), **changes}, "options")


def _non_finite(value: Any, where: str = "") -> str | None:
    """Where (``""`` for the value itself, else ``.key``) a NaN or infinity sits in a config value."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}")
        if found is not None:
            return found
    return None


def check_run_name(name: str) -> str:
    """A run name is one folder inside ``out``: no path separators, not ``.`` or ``..``, no NUL or control chars."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 for c in name) or len(name) > 255):
        raise ConfigError(f"name must be one folder name inside --out (no '/', not '.' or '..', at most 255 "
                          f"characters), got {name!r}")
    return name


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)
_CHOICES = {f.name: f.metadata["choices"] for f in _FIELDS.values() if f.metadata.get("choices")}


def field_types(name: str) -> tuple[type, bool]:
    """``(base type, accepts None)`` of a config field."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def field_help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


def field_choices(name: str) -> tuple[str, ...] | None:
    return _CHOICES.get(name)


def cli_fields() -> list[str]:
    """Fields offered as ``--option`` (the mapping fields have their own ``--model-arg KEY=VALUE``)."""
    return [n for n, f in _FIELDS.items() if f.metadata["cli"]]


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the type of field ``key`` (ints are accepted for floats)."""
    base, nullable = field_types(key)
    if value is None and nullable:
        return None
    if base is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string; accept it as the number it is
    ok = (isinstance(value, base) and not (base is int and isinstance(value, bool))) or (
        base is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        expected = _TYPE_NAMES[base] + (" or null" if nullable else "")
        raise ConfigError(f"{source}: key {key!r} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value) if base is float else value


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping, naming ``source`` in every error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a mapping of option: value, got {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r}{close_matches(str(key), _FIELDS)}; "
                              "see `bestformer train --help` for the options")
        checked[key] = coerce(key, value, source)
    try:
        return TrainConfig(**checked)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the library."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe file from a shipped name (``"cifar10"``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}{close_matches(name_or_path, list_recipes())}; "
                          f"shipped recipes: {', '.join(list_recipes())}, or give a path to a .yaml file")
    return shipped


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The checked mapping of a recipe (only the keys it sets)."""
    path = recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigError(f"recipe {path} cannot be read: {detail}") from None
    values = {} if values is None else values
    config_from_dict(values, f"recipe {path}")  # full check: unknown keys, types, ranges
    return values


def resolve_config(recipe: str | None, overrides: dict[str, Any]) -> tuple[TrainConfig, str | None]:
    """Defaults, then the recipe, then ``overrides``. Without ``recipe``, the shipped recipe named after the
    dataset is used when one exists (so ``bestformer train`` alone runs the ``digits`` demo); ``"none"``
    applies no recipe. Returns the config and the recipe used."""
    if recipe is None:
        dataset = overrides.get("dataset", TrainConfig.dataset)
        recipe = dataset if dataset in list_recipes() else None
    elif recipe.lower() == "none":
        recipe = None
    return config_from_dict(with_recipe(recipe, overrides), "options"), recipe


def with_recipe(recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The values of ``recipe`` (none for ``None``), then ``overrides``; the option mappings (``model_args``,
    ``teacher_args``) merge key by key."""
    values = load_recipe(recipe) if recipe else {}
    merged = {**values, **overrides}
    for key in ("model_args", "teacher_args"):
        if key in values and key in overrides:
            merged[key] = {**values[key], **overrides[key]}
    return merged


def dump_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
