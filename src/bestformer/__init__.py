"""bestformer: compact spiking transformers (BESTformer, A2OS2A, QSD-Transformer, CSDformer) in PyTorch."""

__version__ = "0.1.0"

from .errors import BestformerError, ConfigError, FileFormatError, InputError
from .models import create_model, get_input_config, list_models
from .training import load_checkpoint, save_checkpoint

__all__ = [
    "BestformerError",
    "ConfigError",
    "FileFormatError",
    "InputError",
    "__version__",
    "create_model",
    "get_input_config",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
