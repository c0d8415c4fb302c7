"""Distillation objectives, selected by name (``bestformer train --distill NAME``).

A :class:`Distiller` owns the frozen teacher and turns a batch plus the student's output into the training
loss. ``"hard"`` is BESTformer's information-enhanced distillation, Eq. 15; other modules register more
(``"fgd"``, QSD-Transformer's fine-grained distillation) with :func:`register_distiller`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_choice


def soft_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against class indices ``[B]`` or soft targets ``[B, K]`` (mixup / cutmix)."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / target.shape[-1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def split_outputs(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """``(classification logits, distillation logits or None)`` from a model output."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


class Distiller(nn.Module):
    """Base class: holds a teacher in eval mode, never trained (its parameters get no gradient)."""

    def __init__(self, teacher: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.label_smoothing = label_smoothing

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode
        return self

    def forward(self, x: Tensor, target: Tensor, student_out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        raise NotImplementedError


class HardDistillation(Distiller):
    """Eq. 15: ``L = (CE(y_hat, y) + CE(y_hat_d, y_T)) / 2`` with ``y_T = argmax teacher(x)``.

    ``y_hat`` is the classification head (on ``X^{S,0}``), ``y_hat_d`` the distillation head (on
    ``X^{S,1}``); the teacher sees the same (augmented) batch. ``target`` may be soft (mixup), as in the
    reference's DeiT-style recipe. A one-head student uses its single output for both terms.
    """

    def forward(self, x: Tensor, target: Tensor, student_out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        logits, logits_dist = split_outputs(student_out)
        with torch.no_grad():
            teacher_out = self.teacher(x)
            teacher_logits = split_outputs(teacher_out)[0] if isinstance(teacher_out, tuple) else teacher_out
            y_teacher = teacher_logits.argmax(dim=-1)
        base = soft_cross_entropy(logits, target, self.label_smoothing)
        dist = F.cross_entropy(logits if logits_dist is None else logits_dist, y_teacher)
        return (base + dist) / 2


_DISTILLERS: dict[str, Callable[..., Distiller]] = {"hard": HardDistillation}
#: distillers living in their own module, which registers them when imported: imported when first asked for
_LAZY: dict[str, str] = {"fgd": "bestformer.training.fgd"}


def register_distiller(name: str, factory: Callable[..., Distiller]) -> None:
    """Make a distillation objective selectable by name: ``factory(teacher, label_smoothing=..., **kw)``."""
    _DISTILLERS[name] = factory


def list_distillers() -> list[str]:
    """Names of the distillation objectives, in registration order (``"hard"``, Eq. 15, first), then those whose
    module is imported when first chosen (``"fgd"``)."""
    return list(dict.fromkeys([*_DISTILLERS, *_LAZY]))


def get_distiller(name: str) -> Callable[..., Distiller]:
    """The factory registered as ``name`` (importing its module first if it lives in one of its own)."""
    check_choice("distillation", name, list_distillers())
    if name in _LAZY and name not in _DISTILLERS:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as err:
            raise ConfigError(f"distillation {name!r} is not available in this installation ({err})") from None
    return _DISTILLERS[name]


def check_teacher_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must predict the same classes as the student."""
    ns, nt = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if ns is not None and nt is not None and ns != nt:
        raise ConfigError(f"teacher predicts {nt} classes but the student {ns}; train the teacher on the same dataset")
