"""Training: configs and recipes, the engine, distillation, checkpoints and resumable runs."""

from .checkpoint import load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .distill import list_distillers, register_distiller
from .engine import NonFiniteLossError, Trainer, evaluate
from .randaugment import RandAugment
from .runner import TrainResult, parameter_counts, results_table, resume, train

__all__ = [
    "NonFiniteLossError",
    "RandAugment",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "list_distillers",
    "list_recipes",
    "load_checkpoint",
    "load_recipe",
    "load_weights",
    "parameter_counts",
    "read_checkpoint",
    "register_distiller",
    "resolve_config",
    "results_table",
    "resume",
    "save_checkpoint",
    "train",
]
