"""Model registry (timm style): ``register_model`` entry points, ``create_model``, ``list_models``.

Each registered name is a small function that merges its architecture defaults with the user's overrides
and calls :func:`build_model`, which checks every override against the model class before building it.
A family registers all its sizes at once with :func:`register_family`.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, close_matches


@dataclass(frozen=True)
class InputConfig:
    """Data metadata of a registered model, apart from its architecture (timm's pretrained_cfg).

    Attributes: img_size (square side), in_channels, num_classes, time_steps, and the dataset the
    reference configuration is for (used as the default of ``bestformer train --model NAME``).
    """

    img_size: int
    in_channels: int
    num_classes: int
    time_steps: int
    dataset: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUT_CONFIGS: dict[str, InputConfig] = {}
_DEPRECATED: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module], input_config: InputConfig) -> Callable[..., nn.Module]:
    """Register the entry point ``fn`` under its function name, with its data metadata."""
    _MODELS[fn.__name__] = fn
    _INPUT_CONFIGS[fn.__name__] = input_config
    return fn


def get_input_config(name: str) -> InputConfig:
    """Input metadata (img_size, in_channels, num_classes, time_steps, dataset) of a registered model."""
    name = _DEPRECATED.get(name, name)
    if name not in _INPUT_CONFIGS:
        raise ConfigError(f"unknown model {name!r}{close_matches(name, _MODELS)}; see bestformer.list_models()")
    return _INPUT_CONFIGS[name]


def register_alias(old: str, new: str) -> None:
    """Keep a renamed model loadable under its old name."""
    _DEPRECATED[old] = new


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style wildcard, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS or name in _DEPRECATED


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model. ``overrides`` replace any architecture or input option, e.g.
    ``create_model("bestformer_4_384", num_classes=100, time_steps=2)``."""
    name = _DEPRECATED.get(name, name)
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}{close_matches(name, _MODELS)}; see bestformer.list_models()")
    return _MODELS[name](**overrides)


def _parameters(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    """The options of ``cls.__init__`` by name (``self`` and ``**kwargs`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def _family_entry(name: str) -> Any:
    """The entry :func:`register_family` made for ``name`` (old names followed), or ``None``: unknown, or
    registered by hand (no class and defaults to read)."""
    entry = _MODELS.get(_DEPRECATED.get(name, name))
    return entry if getattr(entry, "model_class", None) is not None else None


def model_option_names(name: str) -> list[str] | None:
    """The option names ``create_model(name, ...)`` accepts (``None``: not known, an entry registered by hand)."""
    entry = _family_entry(name)
    return None if entry is None else [*_parameters(entry.model_class), *entry.extra_options]


def model_option_default(name: str, option: str) -> Any:
    """The value ``create_model(name)`` gives ``option`` when it is not passed (the entry's registered defaults,
    else the class's signature); ``None`` when not known."""
    entry = _family_entry(name)
    if entry is None:
        return None
    if option in entry.defaults:
        return entry.defaults[option]
    param = _parameters(entry.model_class).get(option)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def build_model(cls: type[nn.Module], name: str, defaults: dict[str, Any], overrides: dict[str, Any]
                ) -> nn.Module:
    """Instantiate ``cls(**defaults | overrides)`` after checking every override name; the model records
    ``model_name`` and ``model_args`` (the overrides) so that a checkpoint can rebuild it."""
    accepted = list(_parameters(cls))
    for key in overrides:
        if key not in accepted:
            raise ConfigError(
                f"model {name!r} has no option {key!r}{close_matches(key, accepted)}; "
                f"options: {', '.join(sorted(accepted))}"
            )
    try:
        model = cls(**{**defaults, **overrides})
    except TypeError as err:  # a nested option the signature check cannot see, e.g. neuron_kwargs={"x": 1}
        raise ConfigError(f"model {name!r} cannot be built with the options {overrides}: {err}") from None
    model.model_name = name
    model.model_args = dict(overrides)
    return model


Builder = Callable[[type[nn.Module], str, dict[str, Any], dict[str, Any]], nn.Module]


def _entry(cls: type[nn.Module], name: str, defaults: dict[str, Any], build: Builder,
           extra_options: tuple[str, ...]) -> Callable[..., nn.Module]:
    def entry(**overrides: Any) -> nn.Module:
        return build(cls, name, defaults, overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.model_class, entry.extra_options, entry.defaults = cls, extra_options, defaults  # type: ignore[attr-defined]
    return entry


def register_family(cls: type[nn.Module], family: str, sizes: Mapping[str, tuple[Mapping[str, Any], InputConfig]],
                    defaults: Mapping[str, Any] | None = None, *, title: str | None = None, note: str = "",
                    build: Builder = build_model, extra_options: tuple[str, ...] = ()) -> list[str]:
    """Register ``{family}_{size}`` for every size: the entry merges the family's ``defaults``, the size's
    architecture and its input options, then calls ``build(cls, name, defaults, overrides)`` (default
    :func:`build_model`; ``extra_options``: the names a custom ``build`` takes beyond the class's own). Returns the
    registered names.

    Example: ``register_family(MyNet, "mynet", {"tiny": (dict(depth=1), InputConfig(28, 1, 10, 4, "mnist"))},
    dict(weight_bits=1))`` registers ``mynet_tiny``.
    """
    names = []
    for size, (arch, inp) in sizes.items():
        name = f"{family}_{size}"
        merged = {**(defaults or {}), **arch, "img_size": inp.img_size, "in_channels": inp.in_channels,
                  "num_classes": inp.num_classes, "time_steps": inp.time_steps}

        entry = _entry(cls, name, merged, build, extra_options)
        entry.__doc__ = f"{title or family} {size.replace('_', '-')}: {merged}{note}"
        register_model(entry, inp)
        names.append(name)
    return names


#: (model-name pattern, option, the default before, first library version with the new default)
_DEFAULT_CHANGES: list[tuple[str, str, Any, tuple[int, ...]]] = []


def _version(text: Any) -> tuple[int, ...]:
    """``"0.2.0"`` -> ``(0, 2, 0)``; anything unreadable counts as the oldest version."""
    parts = str(text).split("+")[0].split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (0,)


def register_default_change(pattern: str, option: str, old_value: Any, since: str) -> None:
    """Record that ``option`` of the models matching ``pattern`` changed its default in version ``since``: a model
    saved by an older version without that option is rebuilt with ``old_value`` (:func:`saved_model_args`)."""
    _DEFAULT_CHANGES.append((pattern, option, old_value, _version(since)))


def saved_model_args(name: str, model_args: dict[str, Any], library_version: Any) -> dict[str, Any]:
    """The options that rebuild model ``name`` saved with ``model_args`` by bestformer ``library_version``: a
    checkpoint stores only the options given, so an option whose default changed since is pinned to its old
    default."""
    saved = _version(library_version)
    pinned = {option: old for pattern, option, old, since in _DEFAULT_CHANGES
              if saved < since and fnmatch.fnmatchcase(name, pattern)}
    return {**pinned, **model_args}
