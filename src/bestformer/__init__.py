"""bestformer: compact spiking transformers (BESTformer, A2OS2A, QSD-Transformer, CSDformer) in PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import BestformerError, ConfigError, FileFormatError, InputError

# The torch-dependent API loads on first use (PEP 562), so that the packed runtime
# (bestformer.deploy.runtime, numpy + numba) imports without torch.
_LAZY = {
    "create_model": "zoo",  # models.create_model, plus pretrained= (the zoo)
    "get_input_config": "models",
    "list_models": "models",
    "build_datasets": "data",
    "list_datasets": "data",
    "TrainConfig": "training",
    "evaluate": "training",
    "load_checkpoint": "training",
    "resolve_config": "training",
    "resume": "training",
    "save_checkpoint": "training",
    "train": "training",
    "profile_model": "analysis",
    "list_pretrained": "zoo",
    "load_pretrained": "zoo",
    "save_pretrained": "zoo",
    "from_pretrained": "zoo",
    "push_to_hub": "zoo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # ``bestformer.models`` etc. keep working after a bare ``import bestformer``
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BestformerError",
    "ConfigError",
    "FileFormatError",
    "InputError",
    "TrainConfig",
    "__version__",
    "build_datasets",
    "create_model",
    "evaluate",
    "from_pretrained",
    "get_input_config",
    "list_datasets",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "load_pretrained",
    "profile_model",
    "push_to_hub",
    "resolve_config",
    "resume",
    "save_checkpoint",
    "save_pretrained",
    "train",
]
