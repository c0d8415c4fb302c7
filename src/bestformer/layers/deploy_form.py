"""The deployment form of a model: re-parameterised convolutions folded, as the model would run on a chip.

A layer that trains in a factorised form but deploys as one operation has a ``deploy_form()`` method that
returns its evaluation-mode equivalent (e.g. :meth:`bestformer.layers.qsd.RepConvBN.deploy_form`: a 1x1 /
depthwise 3x3 / 1x1 chain with two BatchNorms becomes one dense 3x3 convolution on spikes plus a bias).
:func:`deployment_form` applies every such fold to a copy of a model; operation counting
(:func:`bestformer.analysis.profile.profile_model`) runs on it, so that every product is charged by the operand
types it has at deployment, not by those of the training-time factorisation.

A folded convolution is a :class:`FoldedConv2d`: a plain convolution with a float weight that says the
weight bit-width the folded layers were trained with (:attr:`FoldedConv2d.weight_bits`). Its weight is the
exact product of the folded quantized weights and BatchNorm scales, so it is not itself on a ``b``-bit grid:
the bit-width is the declared one of the layers it replaces (the convention of the QSD-Transformer code, which
counts the re-parameterised convolution as one spike-driven convolution of the model's weight bits).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from ..quant import QuantMixin


class FoldedConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` holding a folded (re-parameterised) weight and bias, applied to ``[..., C, H, W]`` (every
    leading dimension, e.g. ``T, B``, is flattened into the batch).

    ``weight_bits``: the declared bit-width of the layers folded into it (what op counting and NS-ACE read
    through :func:`bestformer.quant.weight_bits_of`); there is no weight quantizer (the folded weight is used
    as stored, in full precision).
    """

    def __init__(self, *args: Any, weight_bits: int = 32, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.weight_quantizer = None
        self._weight_bits = int(weight_bits)

    @property
    def weight_bits(self) -> int:  # type: ignore[override]
        """The declared bits of the folded layers (not the precision of the stored float weight)."""
        return self._weight_bits

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = self._conv_forward(x.reshape(-1, *x.shape[-3:]), self.weight, self.bias)
        return y.view(*lead, *y.shape[1:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self._weight_bits}"


def has_deploy_form(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules has a ``deploy_form()`` method (something to fold)."""
    return any(callable(getattr(m, "deploy_form", None)) for m in model.modules())


def _fold_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        fold = getattr(child, "deploy_form", None)
        if callable(fold):
            setattr(module, name, fold())
        else:
            _fold_children(child)


def deployment_form(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in evaluation mode in which every submodule with a ``deploy_form()`` method is
    replaced by what it returns (outermost first: a replaced module is not searched further); a model without
    such submodules comes back as an unchanged copy. The folds use the evaluation-mode function (BatchNorm
    running statistics, quantized weights), so the copy computes what ``model.eval()`` computes, up to
    floating-point rounding. ``model`` itself is not changed."""
    out = copy.deepcopy(model).eval()
    fold = getattr(out, "deploy_form", None)
    if callable(fold):
        return fold().eval()
    _fold_children(out)
    return out.eval()
