"""Training configuration: one typed dataclass of seven groups (:mod:`.config_groups`), YAML recipes and
command-line overrides.

Every option of :class:`TrainConfig` is a flat recipe key (YAML) and a command-line option (``batch_size`` ->
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
import operator
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..data import BuildOptions
from ..data.transforms import parse_spec
from ..errors import ConfigError, close_matches
from ..models import get_input_config, model_option_default, model_option_names
from ..neurons import neuron_option_names
from .budget import parse_duration, parse_time_step_schedule
from .config_groups import (
    GROUPS,
    ArchConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
)

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Every option of a training run (recipe keys and ``bestformer train`` options), in seven groups.

    Built from flat options (``TrainConfig(lr=0.01, epochs=3)``) and/or whole groups (``TrainConfig(optim=...)``);
    every option reads flat too (``cfg.lr`` is ``cfg.optim.lr``). The defaults are generic; the recipes
    (``bestformer/recipes/*.yaml``) set up each dataset. Frozen: :meth:`replace` makes a checked copy.
    """

    arch: ArchConfig
    data: DataConfig
    schedule: ScheduleConfig
    optim: OptimConfig
    augment: AugmentConfig
    distillation: DistillConfig
    runtime: RuntimeConfig

    def __init__(self, **values: Any) -> None:
        for group, cls in GROUPS.items():
            base = values.pop(group, None) or cls()
            own = {k: values.pop(k) for k in [k for k in values if _GROUP_OF.get(k) == group]}
            object.__setattr__(self, group, dataclasses.replace(base, **own) if own else base)
        if values:
            raise TypeError(f"TrainConfig got unexpected option(s): {', '.join(map(str, values))}")
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
        if not 0 <= self.seed < 2**64:  # torch.manual_seed's range (a negative one would alias a large one)
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed}")
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
        """The flat options (recipe keys): what config.yaml, checkpoint headers and resume states hold."""
        return {k: v for group in GROUPS for k, v in dataclasses.asdict(getattr(self, group)).items()}

    def teacher_config(self, model: str, time_steps: int | None) -> TrainConfig:
        """The config of a teacher (architecture ``model``) trained first in this run: the student's data,
        optimizer, augmentation and runtime, with ``teacher_args`` / ``teacher_epochs`` / ``teacher_lr`` as its own,
        no teacher or initial weights of its own, and the plain cosine schedule (no cool-down, budget, step cap or
        time-step schedule; warm-up at most its epochs). ``time_steps``: the data's frames (event data), else
        ``None`` (the teacher's default T)."""
        epochs = self.teacher_epochs or self.epochs
        schedule = dataclasses.replace(self.schedule, epochs=epochs, cooldown_epochs=0, time_budget=None,
                                       max_steps=None, time_step_schedule=None,
                                       warmup_epochs=float(min(self.warmup_epochs, epochs)))
        return TrainConfig(arch=ArchConfig(model=model, model_args=dict(self.teacher_args)),
                           data=dataclasses.replace(self.data, time_steps=time_steps), schedule=schedule,
                           optim=dataclasses.replace(self.optim, lr=self.teacher_lr or self.lr),
                           augment=self.augment, distillation=DistillConfig(), runtime=self.runtime)

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


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in GROUPS.values() for f in dataclasses.fields(cls)}
_GROUP_OF: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
_HINTS: dict[str, Any] = {k: v for cls in GROUPS.values() for k, v in typing.get_type_hints(cls).items()}
# the flat aliases: cfg.lr reads cfg.optim.lr (read-only, as the groups are frozen)
for _name, _group in _GROUP_OF.items():
    setattr(TrainConfig, _name, property(operator.attrgetter(f"{_group}.{_name}"), doc=_FIELDS[_name].metadata["help"]))
del _name, _group
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
    for key, value in flat_options(values, source).items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r}{close_matches(str(key), _FIELDS)}; "
                              "see `bestformer train --help` for the options")
        checked[key] = coerce(key, value, source)
    try:
        return TrainConfig(**checked)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def resolve_time_steps(cfg: TrainConfig) -> int:
    """The run's ``T``, resolved once here and passed down: ``time_steps`` of the recipe or command line, else the
    model's own (its input config; an unknown model fails here). Event data are binned into this many frames."""
    return cfg.time_steps or get_input_config(cfg.model).time_steps


def model_time_steps(model: nn.Module) -> int:
    """``T`` of a built model (event data are binned into its frames); a model without one (an ANN) reads the
    datasets' default frame count."""
    return getattr(model, "time_steps", None) or BuildOptions.time_steps


def flat_options(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` with grouped sections (``optim: {lr: 0.1}``) spelt flat (``lr: 0.1``); flat keys pass as they are."""
    flat = {k: v for k, v in values.items() if k not in GROUPS}
    for group in (g for g in GROUPS if g in values):
        section = values[group]
        if isinstance(section, GROUPS[group]):  # a group object, e.g. cfg.replace(optim=other.optim)
            section = dataclasses.asdict(section)
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {group!r} must be a mapping of option: value")
        for key, value in section.items():
            if _GROUP_OF.get(key) != group:
                raise ConfigError(f"{source}: {key!r} is not an option of section {group!r}"
                                  f"{close_matches(str(key), [k for k, g in _GROUP_OF.items() if g == group])}")
            flat[key] = value
    return flat


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
    applies no recipe. A ``batch_size`` given without a ``cuda_batch_size`` is the batch on every device (the
    recipe's GPU batch no longer replaces it). Returns the config and the recipe used."""
    if recipe is None:
        recipe = implied_recipe(overrides)
    elif recipe.lower() == "none":
        recipe = None
    given = flat_options(overrides, "options")
    steps, model_steps = given.get("time_steps"), (given.get("model_args") or {}).get("time_steps")
    if steps is not None and model_steps is not None and steps != model_steps:
        raise ConfigError(f"--time-steps {steps} and --model-arg time_steps={model_steps} disagree; give one")
    return config_from_dict(gpu_batch_rule(with_recipe(recipe, overrides), overrides), "options"), recipe


def gpu_batch_rule(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a recipe merged with ``overrides``) where a ``batch_size`` given without a ``cuda_batch_size``
    is the batch on every device: the recipe's GPU batch no longer replaces it."""
    given = flat_options(overrides, "options")
    if "batch_size" in given and "cuda_batch_size" not in given:
        return {**values, "cuda_batch_size": None}
    return values


def implied_recipe(overrides: dict[str, Any]) -> str | None:
    """The recipe of a command without ``--recipe``: the shipped one named after its dataset, if any."""
    dataset = flat_options(overrides, "options").get("dataset", DataConfig.dataset)
    return dataset if dataset in list_recipes() else None


def with_recipe(recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The values of ``recipe`` (none for ``None``), then ``overrides``, both spelt flat (a recipe's grouped
    sections must not outrank the command line); the option mappings (``model_args``, ``teacher_args``) merge key
    by key, nested ones too (:func:`merge_mappings`). When ``overrides`` name another model (or teacher) than the
    recipe's, the recipe's options for its own model are kept only where the other one takes them
    (``--model csd_tiny --dataset digits``: the width and the pooling, not the LIF options a CSD model has no place
    for); so are its ``neuron_kwargs`` where the run's neuron takes them (:func:`_for_neuron`)."""
    values = flat_options(load_recipe(recipe), f"recipe {recipe}") if recipe else {}
    overrides = flat_options(overrides, "options")
    for name, args in (("model", "model_args"), ("teacher", "teacher_args")):
        # a recipe's options for its own model reach another model only where that one takes them
        other = overrides.get(name, values.get(name))
        accepted = None
        if other != values.get(name) and isinstance(values.get(args), dict):
            accepted = model_option_names(other)
        if accepted is not None:
            values = {**values, args: {k: v for k, v in values[args].items() if k in accepted}}
        if isinstance(values.get(args), dict) and isinstance(values[args].get("neuron_kwargs"), dict):
            values = {**values, args: _for_neuron(values[args], values.get(name), overrides.get(args), other)}
    merged = {**values, **overrides}
    for key in ("model_args", "teacher_args"):
        if key in values and key in overrides:
            merged[key] = merge_mappings(values[key], overrides[key])
    return merged


def _for_neuron(recipe_args: dict[str, Any], recipe_model: Any, given: Any, model: Any) -> dict[str, Any]:
    """A recipe's ``neuron_kwargs``, for a run whose neuron is another than the one the recipe wrote them for, keep
    only the options that neuron takes: the digits recipe's LIF ``decay_input`` has no place in ``--model
    qsd_tiny``'s IE-LIF, nor under ``--model-arg neuron=ielif``. For the recipe's own neuron they all stay (a
    misspelt one fails when the model is built, not silently)."""
    def default(name: Any) -> Any:
        return model_option_default(name, "neuron") if isinstance(name, str) else None

    neuron = given.get("neuron") if isinstance(given, dict) else None
    neuron = neuron or recipe_args.get("neuron") or default(model)
    if neuron == (recipe_args.get("neuron") or default(recipe_model)):
        return recipe_args
    accepted = neuron_option_names(neuron) if isinstance(neuron, str) else None
    if accepted is None:
        return recipe_args
    kept = {k: v for k, v in recipe_args["neuron_kwargs"].items() if k in accepted}
    return {k: v for k, v in recipe_args.items() if k != "neuron_kwargs"} | ({"neuron_kwargs": kept} if kept else {})


def merge_mappings(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` key by key, nested mappings too: ``--model-arg neuron_kwargs={tau: 3}`` keeps
    a recipe's ``neuron_kwargs: {decay_input: false}`` (replacing the whole mapping changed the neuron's charge
    equation unasked). Anything else in ``over``, a ``None`` included, replaces what ``base`` has."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: merge_mappings(base[k], v) if k in base else v for k, v in over.items()}}


def dump_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
