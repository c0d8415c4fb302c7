"""A model put in eval mode for a while and given back as it was, every submodule's own mode included."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` within the block; afterwards every submodule gets back its own ``training`` flag.
    ``model.train(was_training)`` would set them all alike: a BatchNorm kept in eval mode while the rest trains (a
    frozen BatchNorm, timm's fine-tuning) came back training, and its statistics drifted from the next step on."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
