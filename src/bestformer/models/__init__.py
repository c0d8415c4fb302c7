"""Models and their registry. Importing this package registers every model family."""

from . import spiking_transformer
from ._registry import (
    InputConfig,
    build_model,
    create_model,
    get_input_config,
    is_model,
    list_models,
    register_alias,
    register_model,
)
from .spiking_transformer import SpikingTransformer

__all__ = [
    "InputConfig",
    "SpikingTransformer",
    "build_model",
    "create_model",
    "get_input_config",
    "is_model",
    "list_models",
    "register_alias",
    "register_model",
    "spiking_transformer",
]
