"""ONNX export (issue 23): the path to TensorRT, OpenVINO and most accelerators.

``export_onnx(model, "model.onnx")`` writes one ONNX graph of the model in eval mode:

- the T time steps are unrolled (the graph takes the same input as the model: images ``[B, C, H, W]`` or event
  frames ``[T, B, C, H, W]``, and returns the logits ``[B, classes]``); the batch size is dynamic;
- 1-bit weights are stored as their exact +-1 values (Eq. 6; no latent weights, no standardization in the graph);
- every BatchNorm is folded into the per-channel affine ``x * alpha + b`` PyTorch's CPU kernel forms
  (:func:`.fold.bn_constants`), as a ``Mul`` then an ``Add``: two roundings where that kernel rounds once (a fused
  multiply-add, which opset 17 cannot express), so a membrane within one rounding of its threshold can fire on
  one side and not the other (the packed runtime, :mod:`.runtime`, reproduces the single rounding);
- spiking neurons become their element-wise update (``Mul``, ``Add``, ``GreaterOrEqual``, ``Where``) per step.

It needs the optional ``onnx`` package (``pip install 'bestformer[onnx]'``). A model (or option) the exporter
cannot express fails with one :class:`~bestformer.errors.ConfigError` line naming what and why. The result is
checked with ``onnx.checker``; ``tests/test_onnx.py`` runs exported files in onnxruntime against PyTorch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_path
from ..neurons import LIF
from ..quant.quantizers import SignBinarizer
from .fold import bn_constants

OPSET = 17


class ChannelAffine(nn.Module):
    """A folded eval-mode BatchNorm: ``x * alpha + b`` along dimension 1 (rounded twice: module docstring)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        alpha, beta = bn_constants(bn)
        self.register_buffer("alpha", torch.from_numpy(alpha))
        self.register_buffer("beta", torch.from_numpy(beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.alpha.view(shape) + self.beta.view(shape)


def prepare_for_onnx(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with +-1 weights in place of binarized latents and BatchNorms folded."""
    m = copy.deepcopy(model).eval()
    for module in m.modules():
        if isinstance(module, LIF):
            module.backend = "plain"  # the fused kernels are compiled code the exporter cannot trace
        q = getattr(module, "weight_quantizer", None)
        if isinstance(q, SignBinarizer):
            with torch.no_grad():
                module.weight.copy_(q.codes(module.weight.float())[0].to(module.weight.dtype))
            module.weight_quantizer = None  # the weight is now the binary weight itself
    for module in list(m.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, ChannelAffine(child))
    return m


def example_input(model: nn.Module, events: bool = False, batch: int = 2) -> torch.Tensor:
    """An input of the shape ``model`` takes: images ``[B, C, H, W]``, or with ``events`` ``[T, B, C, H, W]``."""
    try:
        c, size = int(model.in_channels), int(model.img_size)
    except (AttributeError, TypeError):
        raise ConfigError(f"{type(model).__name__} does not declare in_channels / img_size, so its ONNX input "
                          "shape is unknown") from None
    if events:
        return torch.zeros(int(model.time_steps), batch, c, size, size)
    return torch.zeros(batch, c, size, size)


def export_onnx(model: nn.Module, path: str | Path, events: bool = False, opset: int = OPSET) -> Path:
    """Write ``model`` as an ONNX file (see the module docstring); ``events``: the graph takes event frames
    ``[T, B, C, H, W]`` (a model trained on an event dataset), else images. Returns the path."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the optional onnx package: pip install 'bestformer[onnx]'") from None
    path = Path(path)
    prepared = prepare_for_onnx(model)
    x = example_input(prepared, events)
    batch_axis = 1 if x.dim() == 5 else 0
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(prepared, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {batch_axis: "batch"},
                                                                     "logits": {0: "batch"}})
            onnx.checker.check_model(str(tmp))
    except (RuntimeError, TypeError, ValueError, NotImplementedError, onnx.checker.ValidationError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{getattr(model, 'model_name', type(model).__name__)} cannot be expressed in ONNX "
                          f"opset {opset}: {first}") from None
    return path
