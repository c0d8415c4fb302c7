"""The records a count produces: one per product site (:class:`OpStats`), one per spiking layer
(:class:`NeuronStats`); :class:`~bestformer.analysis.ops.OpCounter` fills them, the profile reports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class OpStats:
    """One product site (a layer, or an activation product inside a module), totals per sample.

    ``name`` is the module path, with ``/matmul0``, ``/matmul1``... for the activation products a module issues
    itself. ``operands`` reads like ``"binary x w1"`` (spikes times 1-bit weights) or ``"binary x binary"``.
    ``weight_bits`` is the layer's (``None`` for activation products); ``charge_bits`` the ``b_w`` of NS-ACE.
    ``events``: the products whose event operands are non-zero, each entry once; ``sops``: the same with every
    declared multi-level spike counted as the binary spikes it stands for (equal for binary spikes).
    """

    name: str
    op: str
    operands: str
    weight_bits: int | None
    charge_bits: int
    shape: str
    macs: float = 0.0
    real_macs: float = 0.0
    sops: float = 0.0
    ns_ace: float = 0.0
    calls: int = 0
    events: float = 0.0

    @property
    def firing_rate(self) -> float | None:
        """``events / MACs`` of the synaptic part (``None`` when the product has no event operand)."""
        event_macs = self.macs - self.real_macs
        return self.events / event_macs if event_macs > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "firing_rate": self.firing_rate}


@dataclass
class NeuronStats:
    """Firing of one spiking layer: ``spikes`` non-zero outputs among ``elements`` (all steps and samples)."""

    name: str
    kind: str
    spikes: int = 0
    elements: int = 0

    @property
    def firing_rate(self) -> float:
        return self.spikes / self.elements if self.elements else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "firing_rate": self.firing_rate,
                "spikes": self.spikes, "elements": self.elements}
