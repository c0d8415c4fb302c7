"""bestformer: compact spiking transformers (BESTformer, A2OS2A, QSD-Transformer, CSDformer) in PyTorch."""

from __future__ import annotations

from .errors import BestformerError, ConfigError, FileFormatError, InputError
from .lazy import lazy_exports
from .version import __version__

# The torch-dependent API loads on first use (PEP 562), so that the packed runtime
# (bestformer.deploy.runtime, numpy + numba) imports without torch.
_LAZY = {
    "create_model": "zoo",  # models.create_model, plus pretrained= (the zoo)
    "get_input_config": "models",
    "list_models": "zoo",  # models.list_models, plus pretrained= (the zoo's model.tag names)
    "build_datasets": "data",
    "list_datasets": "data",
    "TrainConfig": "training",
    "evaluate": "pipeline",
    "load_checkpoint": "training",
    "resolve_config": "pipeline",
    "resume": "pipeline",
    "save_checkpoint": "training",
    "train": "pipeline",
    "profile_model": "pipeline",  # analysis.profile_model, with the deployment-file size measured
    "list_pretrained": "zoo",
    "load_pretrained": "zoo",
    "save_pretrained": "zoo",
    "from_pretrained": "zoo",
    "push_to_hub": "zoo",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), submodules=True)

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
