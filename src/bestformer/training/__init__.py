"""Training: configs and recipes, the engine, distillation, checkpoints and resumable run state (the job runner,
``train`` / ``resume``, is :mod:`bestformer.pipeline`)."""

from ..data.transforms import RandAugment
from .checkpoint import load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .distill import get_distiller, list_distillers, register_distiller
from .engine import NonFiniteLossError, Trainer, evaluate
from .result import TrainResult, parameter_counts, results_table

_MOVED = {"train", "resume", "evaluate_saved", "load_weights_spec", "write_profile"}


def __getattr__(name: str) -> object:
    # the job runner moved up to bestformer.pipeline: importing it from here would point an import up
    if name in _MOVED:
        raise ImportError(f"bestformer.training.{name} moved to bestformer.pipeline.{name} (bestformer.{name} for "
                          "train and resume); import it from there")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NonFiniteLossError",
    "RandAugment",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "get_distiller",
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
    "save_checkpoint",
]
