"""What a training run produced (:class:`TrainResult`, its ``summary.json``) and the table printed at its end."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..quant import weight_bits_of


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(1-bit weights, full-precision parameters)`` of a model."""
    one_bit = sum(m.weight.numel() for m in model.modules() if weight_bits_of(m) == 1)
    return one_bit, sum(p.numel() for p in model.parameters()) - one_bit


@dataclass
class TrainResult:
    """What a run produced. ``status``: ``"finished"``, ``"stopped_early"`` or ``"interrupted"``."""

    run_dir: Path
    status: str
    model_name: str
    epochs_done: int
    best_epoch: int | None = None
    val: dict[str, float] | None = None
    test: dict[str, float] | None = None
    params: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    teacher: TrainResult | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None  #: the signal of an interrupted run (SIGINT or SIGTERM)

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0, or 128 + the signal number after an interruption (130 / 143)."""
        if self.status != "interrupted":
            return 0
        return 128 + int(getattr(signal, self.stopped_by or "SIGTERM", signal.SIGTERM))

    @classmethod
    def from_summary(cls, summary: dict[str, Any], history: list[dict[str, Any]]) -> TrainResult:
        """The result of a finished run from its ``summary.json``."""
        teacher = summary.get("teacher")
        return cls(Path(summary["run_dir"]), summary["status"], summary["model_name"], summary["epochs_done"],
                   summary.get("best_epoch"), summary.get("val"), summary.get("test"),
                   (summary["one_bit_params"], summary["full_precision_params"]), summary.get("seconds", 0.0),
                   cls.from_summary(teacher, []) if teacher else None, history)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("teacher", "history", "run_dir", "stopped_by")}
        out["run_dir"] = str(self.run_dir)
        out["one_bit_params"], out["full_precision_params"] = out.pop("params")
        if self.teacher is not None:
            out["teacher"] = self.teacher.summary()
        return out


def results_table(result: TrainResult) -> str:
    """The short table printed at the end of ``bestformer train``."""
    rows = [("model", "role", "val acc", "test acc", "1-bit params", "full-precision params")]

    def acc(metrics: dict[str, float] | None) -> str:
        return f"{metrics['acc1']:.2f}%" if metrics else "-"

    def fmt(r: TrainResult, role: str) -> tuple[str, ...]:
        return (r.model_name, role, acc(r.val), acc(r.test), f"{r.params[0]:,}", f"{r.params[1]:,}")

    if result.teacher is not None:
        rows.append(fmt(result.teacher, "teacher"))
    rows.append(fmt(result, "student" if result.teacher is not None else "model"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
