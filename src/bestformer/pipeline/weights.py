"""Saved models named on the command line: a checkpoint file or a zoo entry (``zoo:NAME``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..training.checkpoint import load_checkpoint
from ..zoo import load_pretrained


def load_weights_spec(spec: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a checkpoint path or a zoo entry (``zoo:NAME``): ``(model, header or meta)``."""
    if str(spec).startswith("zoo:"):
        model, header = load_pretrained(str(spec))
        return model, {**header.get("meta", {}), "model_name": header["model_name"],
                       "model_args": header["model_args"]}
    return load_checkpoint(spec)
