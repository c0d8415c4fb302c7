"""The distillation teacher of a run: a checkpoint or zoo entry loaded frozen, or a registered architecture that
the run trains first in ``<run>/teacher`` (:meth:`~.run.Run.teacher`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, close_matches
from ..models import is_model, list_models
from ..training.dist import DistContext
from ..training.evaluation import log_main
from .ranks import shared_checkpoint


def is_saved_teacher(spec: str) -> bool:
    """Whether ``--teacher`` names saved weights (a checkpoint file or ``zoo:NAME``) rather than an architecture."""
    path = Path(spec)
    return path.suffix == ".safetensors" or path.is_file() or spec.startswith("zoo:")


def load_teacher(spec: str, bundle: Any, ctx: DistContext) -> nn.Module:
    """The saved teacher ``spec`` (read by rank 0, shared with every rank), checked against the dataset."""
    teacher = shared_checkpoint(spec, ctx)
    check_teacher_fits(teacher, bundle, Path(spec))
    log_main(ctx, f"teacher: {teacher.model_name} from {Path(spec)}")
    return teacher


def check_teacher_architecture(spec: str) -> None:
    """A teacher to train first must be a registered model."""
    if not is_model(spec):
        raise ConfigError(f"--teacher {spec!r} is neither a checkpoint file nor a model name"
                          f"{close_matches(spec, list_models())}")


def check_teacher_fits(teacher: nn.Module, bundle: Any, path: Path) -> None:
    for key, want in (("num_classes", bundle.num_classes), ("in_channels", bundle.in_channels),
                      ("img_size", bundle.img_size)):
        have = getattr(teacher, key, want)
        if have != want:
            raise ConfigError(f"teacher {path} has {key}={have} but the dataset {bundle.name} needs {want}; "
                              "train the teacher on the same dataset")
