"""The conversion's error report: the spiking model against the quantized ANN it came from, per DIF delay."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.report import save_png
from ..models.csd import convert
from ..progress import progress_bar


@dataclass(frozen=True)
class ConversionResult:
    """Agreement of the spiking model (one delay) with the ANN on the same inputs.

    ``max_abs`` / ``mean_abs``: largest and mean ``|logit difference|``; ``agreement``: fraction of samples
    with the same top-1 class; accuracies are ``None`` without labels.
    """

    delay: int
    latency: int
    max_abs: float
    mean_abs: float
    agreement: float
    snn_accuracy: float | None
    ann_accuracy: float | None
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_delays(time_steps: int, points: int = 9) -> list[int]:
    """Delays from 0 (plain IF) to ``T`` (exact): all of them, or ``points`` evenly spaced ones."""
    if time_steps + 1 <= points:
        return list(range(time_steps + 1))
    return sorted({round(i * time_steps / (points - 1)) for i in range(points)})


def conversion_errors(ann: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]],
                      time_steps: int | None = None, delays: Sequence[int] | None = None,
                      progress: bool = False) -> list[ConversionResult]:
    """Convert ``ann`` once per delay and compare each spiking model's logits with the ANN's.

    ``batches`` yields ``(x, y)`` (``y`` may be ``None``). A frame tensor ``[T, B, C, H, W]`` goes to the spiking
    model one frame per step and to the ANN as its mean frame (the same total input). Default delays: ``T``.
    ``ann`` is put in eval mode (BatchNorm running statistics, as the conversion uses).
    """
    ann.eval()
    steps = ann.levels if time_steps is None else time_steps
    snns = {d: convert(ann, steps, d) for d in (delays if delays is not None else [steps])}
    stats = {d: dict(max_abs=0.0, sum_abs=0.0, agree=0, correct=0) for d in snns}
    ann_correct, samples, labelled = 0, 0, True
    for x, y in progress_bar(batches, desc="conversion error", unit="batch", disable=not progress):
        with torch.no_grad():
            ref = ann(x.mean(dim=0) if x.dim() == 5 else x)
            outs = {d: snn(x) for d, snn in snns.items()}
        samples += ref.shape[0]
        labelled = labelled and y is not None
        if y is not None:
            ann_correct += int((ref.argmax(-1) == y).sum())
        for d, out in outs.items():
            diff = (out - ref).abs()
            s = stats[d]
            s["max_abs"] = max(s["max_abs"], float(diff.max()))
            s["sum_abs"] += float(diff.mean(dim=-1).sum())
            s["agree"] += int((out.argmax(-1) == ref.argmax(-1)).sum())
            if y is not None:
                s["correct"] += int((out.argmax(-1) == y).sum())
    n = max(samples, 1)
    return [
        ConversionResult(
            delay=d, latency=snns[d].latency, max_abs=s["max_abs"], mean_abs=s["sum_abs"] / n,
            agreement=s["agree"] / n, snn_accuracy=s["correct"] / n if labelled else None,
            ann_accuracy=ann_correct / n if labelled else None, samples=samples,
        )
        for d, s in stats.items()
    ]


def plot_delay_sweep(results: Sequence[ConversionResult], path: str | Path, title: str = "") -> Path:
    """PNG of the conversion error and the top-1 agreement / accuracy against the DIF delay (atomic write)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    delays = [r.delay for r in results]
    fig = Figure(figsize=(9, 3.6))
    ax_err, ax_acc = fig.subplots(1, 2)
    ax_err.plot(delays, [r.max_abs for r in results], "o-", label="max |logit diff|")
    ax_err.plot(delays, [r.mean_abs for r in results], "s-", label="mean |logit diff|")
    ax_err.set_xlabel("DIF delay d (steps)")
    ax_err.set_ylabel("spiking vs quantized ANN")
    ax_err.legend()
    ax_acc.plot(delays, [100 * r.agreement for r in results], "o-", label="top-1 agreement with ANN")
    if results and results[0].snn_accuracy is not None:
        ax_acc.plot(delays, [100 * (r.snn_accuracy or 0.0) for r in results], "s-", label="spiking accuracy")
        ax_acc.axhline(100 * (results[0].ann_accuracy or 0.0), color="gray", ls="--", label="ANN accuracy")
    ax_acc.set_xlabel("DIF delay d (steps)")
    ax_acc.set_ylabel("%")
    ax_acc.legend()
    fig.suptitle(title or "CSDformer conversion error against the DIF delay")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
