"""Fine-grained distillation of QSD-Transformer (Li et al., ICLR 2025): in every Q-SDSA block the student's
q, k and v are aligned with those of an ANN teacher of the same layout (``ann_qsd_*``).

The paper's figure shows the alignment; its loss is not public (reviews say "based on mutual information").
Ours is scale-free, so that multi-level spikes in ``[0, 1]`` can be compared with unbounded ReLU
activations: for each block, each of q / k / v and each head, the token-similarity (Gram) matrix
``G = F F^T`` of the features ``F`` (``[N tokens, d]``, the student's averaged over its time steps) is
normalised to unit Frobenius norm, and the loss is ``|| G_s / |G_s| - G_t / |G_t| ||_F^2 = 2 - 2 cos(G_s,
G_t)``, in ``[0, 2]`` (non-negative features), averaged over heads, samples, q/k/v and blocks. It is zero
exactly when every student similarity matrix is proportional to the teacher's, and independent of the
feature widths (only the heads and tokens must match).

Training loss: ``CE(student logits, target) + weight * L_fgd`` (``weight = 1`` by default; ours).
The student's q/k/v are captured by forward hooks on its Q-SDSA neurons while the training step runs the
student; the teacher (eval mode, no gradient) is run on the same batch inside the distiller.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import BestformerError, ConfigError, InputError
from ..layers.memory import recomputing
from ..layers.qsd import QSDSA
from .distill import Distiller, register_distiller, soft_cross_entropy, split_outputs

_BRANCHES = ("q", "k", "v")


def normalized_similarity(f: Tensor, heads: int, eps: float = 1e-12) -> Tensor:
    """Per-head token-similarity matrices of a Q-SDSA feature ``[T, B, C, H, W]``, averaged over ``T`` and
    normalised to unit Frobenius norm: ``[B, heads, N, N]``."""
    b, c = f.shape[1:3]
    x = f.mean(dim=0).reshape(b, heads, c // heads, -1)  # [B, heads, d, N]
    g = x.transpose(-1, -2) @ x
    return g / (g.flatten(2).norm(dim=-1)[..., None, None] + eps)


def similarity_loss(student: Tensor, teacher: Tensor, heads: int) -> Tensor:
    """``|| G_s/|G_s| - G_t/|G_t| ||_F^2`` per head and sample, averaged."""
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[1] != teacher.shape[1]:
        raise InputError(f"student q/k/v {tuple(student.shape[1:])} and teacher {tuple(teacher.shape[1:])} "
                         "differ in batch or token grid; give the teacher the same img_size")
    gs, gt = normalized_similarity(student, heads), normalized_similarity(teacher, heads)
    return (gs - gt).pow(2).sum(dim=(-1, -2)).mean()


class _Recorder:
    """The outputs of hooked modules by key. The hooks point here, not at the distiller, so copying a hooked
    model (an EMA copy, say) copies this small object and not the teacher."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[int, str], Tensor] = {}

    def record(self, key: tuple[int, str], module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not recomputing():  # a checkpointed block re-run in backward: the step's q/k/v are already here
            self.outputs[key] = output


def _attention_modules(model: nn.Module, role: str) -> list[QSDSA]:
    found = [m for m in model.modules() if isinstance(m, QSDSA)]
    if not found:
        raise ConfigError(f"fine-grained distillation needs Q-SDSA blocks, but the {role} "
                          f"({type(model).__name__}) has none; use qsd_* / ann_qsd_* models")
    return found


class FineGrainedDistillation(Distiller):
    """``CE + weight * L_fgd`` (module docstring).

    Args:
        teacher: the ANN of the same layout (e.g. ``ann_qsd_tiny`` for ``qsd_tiny``), trained; kept in eval mode.
        label_smoothing: of the task cross-entropy.
        student: the model being trained (required: its Q-SDSA neurons are hooked; it is not stored).
        weight: the weight of the distillation term.
    """

    def __init__(self, teacher: nn.Module, label_smoothing: float = 0.0, student: nn.Module | None = None,
                 weight: float = 1.0) -> None:
        super().__init__(teacher, label_smoothing)
        if student is None:
            raise ConfigError("fine-grained distillation needs the student: build it as "
                              "factory(teacher, label_smoothing=..., student=model)")
        if not weight >= 0:
            raise ConfigError(f"fine-grained distillation weight must be >= 0, got {weight!r}")
        s_attn, t_attn = _attention_modules(student, "student"), _attention_modules(teacher, "teacher")
        if len(s_attn) != len(t_attn):
            raise ConfigError(f"student has {len(s_attn)} Q-SDSA blocks but the teacher {len(t_attn)}; "
                              "use the teacher of the same size (ann_qsd_* for qsd_*)")
        for i, (s, t) in enumerate(zip(s_attn, t_attn)):
            if s.heads != t.heads:
                raise ConfigError(f"Q-SDSA block {i}: student has {s.heads} heads, teacher {t.heads}")
        self.weight = float(weight)
        self.heads = [s.heads for s in s_attn]
        self._student, self._teacher = _Recorder(), _Recorder()
        self._handles: list[RemovableHandle] = []
        for recorder, modules in ((self._student, s_attn), (self._teacher, t_attn)):
            for i, attn in enumerate(modules):
                for branch in _BRANCHES:
                    neuron = getattr(attn, f"{branch}_neuron")
                    self._handles.append(neuron.register_forward_hook(partial(recorder.record, (i, branch))))
        self.last_losses: dict[str, float] = {}

    def remove_hooks(self) -> None:
        """Detach from the student and the teacher (the distiller is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def distillation_loss(self) -> Tensor:
        """``L_fgd`` from the q/k/v recorded in the last student and teacher forward passes."""
        student, teacher = self._student.outputs, self._teacher.outputs
        if len(student) != len(teacher) or not student:
            raise BestformerError("fine-grained distillation found no student q/k/v for this batch: run the "
                                  "student on the batch (the hooked model) before calling the distiller")
        terms = [similarity_loss(student[key], teacher[key], self.heads[key[0]]) for key in teacher]
        return torch.stack(terms).mean()

    def forward(self, x: Tensor, target: Tensor, student_out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        logits, _ = split_outputs(student_out)
        with torch.no_grad():
            self.teacher(x)
        try:
            fgd = self.distillation_loss()
        finally:
            for recorder in (self._student, self._teacher):
                recorder.outputs.clear()  # drop the references to this step's graph
        task = soft_cross_entropy(logits, target, self.label_smoothing)
        self.last_losses = {"task": float(task.detach()), "fgd": float(fgd.detach())}
        return task + self.weight * fgd

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, blocks={len(self.heads)}"


register_distiller("fgd", FineGrainedDistillation)
