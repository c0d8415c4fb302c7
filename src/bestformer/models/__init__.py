"""Models and their registry. Importing this package registers every model family."""

from . import a2os2a, csd, qsd, spiking_transformer
from ._registry import (
    InputConfig,
    build_model,
    create_model,
    get_input_config,
    is_model,
    list_models,
    model_option_default,
    model_option_names,
    register_alias,
    register_default_change,
    register_family,
    register_model,
    saved_model_args,
)
from .base import BaseModel
from .csd import CSDTransformer
from .qsd import QSDTransformer
from .spiking_transformer import SpikingTransformer

__all__ = [
    "BaseModel",
    "CSDTransformer",
    "InputConfig",
    "QSDTransformer",
    "SpikingTransformer",
    "a2os2a",
    "build_model",
    "create_model",
    "csd",
    "get_input_config",
    "is_model",
    "list_models",
    "model_option_default",
    "model_option_names",
    "qsd",
    "register_alias",
    "register_default_change",
    "register_family",
    "register_model",
    "saved_model_args",
    "spiking_transformer",
]
