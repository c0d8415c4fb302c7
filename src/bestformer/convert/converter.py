"""``convert(ann, time_steps=T, delay=d)``: a trained ``csd_*`` ANN to its spike-driven model (CSDformer)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .neurons import check_delay
from .spiking import SpikingCSD


def convert(ann: nn.Module, time_steps: int | None = None, delay: int | None = None) -> SpikingCSD:
    """Convert a CSDformer ANN into a :class:`SpikingCSD` (BatchNorm folded with its running statistics,
    quantized ReLUs to IF/DIF neurons, products and max-pooling by temporal decomposition).

    Args:
        ann: a ``csd_*`` model (:class:`~bestformer.models.csd.CSDTransformer`), normally trained.
        time_steps: ``T``; default ``L`` (the ANN's ``levels``), the exact setting.
        delay: ``d`` of the DIF neurons, from 0 (plain IF) to ``T``; default ``T`` (exact).

    The result is in eval mode, does not require gradients and keeps ``model_name`` with ``model_args`` plus
    ``spiking={"time_steps": T, "delay": d}``, so ``save_checkpoint`` / ``load_checkpoint`` rebuild it.
    """
    from ..models.csd import CSDTransformer  # the models package imports this one

    if isinstance(ann, SpikingCSD):
        raise ConfigError("this model is already a converted spiking model; convert the csd_* ANN it came from")
    if not isinstance(ann, CSDTransformer):
        name = getattr(ann, "model_name", type(ann).__name__)
        raise ConfigError(f"convert needs a CSDformer ANN (a csd_* model such as csd_tiny), got {name!r}")
    steps = ann.levels if time_steps is None else time_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"time_steps must be an integer >= 1, got {steps!r}")
    d = check_delay(steps if delay is None else delay, steps)
    snn = SpikingCSD(ann, steps, d).eval()
    if hasattr(ann, "model_name"):
        snn.model_name = ann.model_name
        snn.model_args = {**ann.model_args, "spiking": {"time_steps": steps, "delay": d}}
    return snn
