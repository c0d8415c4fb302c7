"""The data of a saved model: the dataset (and validation carve) its training run used, rebuilt from the
config recorded in its checkpoint header. The zoo and ``bestformer eval`` both need it, so it sits here, below
them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data import build_datasets
from ..errors import ConfigError, FileFormatError, InputError
from .config import model_time_steps
from .config_groups import DataConfig


def saved_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The training config recorded in a checkpoint's ``meta`` (``{}`` when it records none)."""
    return meta.get("config") if isinstance(meta.get("config"), dict) else {}


def saved_dataset(meta: dict[str, Any]) -> str | None:
    """The dataset a checkpoint's ``meta`` says its model was trained on (``None`` when it records none)."""
    return meta.get("dataset") or saved_config(meta).get("dataset")


def saved_model_data(model: nn.Module, meta: dict[str, Any], *, source: str = "the model", dataset: str | None = None,
                     data_dir: str | None = None, limit: int | None = None) -> Any:
    """The dataset a saved model (``load_weights_spec``) was trained on (or ``dataset``), split with its training
    run's seed, val_fraction and event binning: the same validation carve as during training. Event data are
    binned into the model's own ``T`` frames."""
    config, defaults = saved_config(meta), DataConfig()
    dataset = dataset or saved_dataset(meta)
    if not dataset:
        raise ConfigError(f"{source} does not record its dataset; pass --dataset NAME")

    def build(folder: str | None) -> Any:
        return build_datasets(dataset, folder, time_steps=model_time_steps(model),
                              split_by=config.get("split_by", defaults.split_by),
                              val_fraction=config.get("val_fraction", defaults.val_fraction),
                              seed=config.get("seed", 0), limit=limit)

    saved_dir = config.get("data_dir")
    try:
        bundle = build(data_dir)
    except FileFormatError:
        # not in the default place: where the run read it, when that is still there (a relative path recorded
        # elsewhere may name another folder, hence only after the default)
        if data_dir is not None or dataset != saved_dataset(meta) or not isinstance(saved_dir, str) \
                or not Path(saved_dir).exists():
            raise
        bundle = build(saved_dir)
    classes = getattr(model, "num_classes", bundle.num_classes)
    if bundle.num_classes != classes:
        raise InputError(f"{dataset} has {bundle.num_classes} classes but {source} predicts {classes}; evaluate it "
                         "on the dataset it was trained on")
    return bundle
