"""A :class:`Profile` (what :func:`~bestformer.analysis.profile.profile_model` measured) and its presentation: a
one-line summary, rich tables, a PNG. (Here rather than in ``profile.py``, which measures and imports this.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from ..fileio import atomic_path, atomic_write_json
from .energy import EnergyModel
from .representation import BlockRepresentation
from .size import ModelSize
from .stats import NeuronStats, OpStats

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'`` (decimal prefixes, three significant digits)."""
    value = float(f"{value:.3g}")  # rounded before the prefix is chosen: 999,600 is '1 M', not '1e+03 k'
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def energy_str(pj: float) -> str:
    """Energy given in picojoules, in the most readable unit."""
    pj = float(f"{pj:.3g}")  # rounded first, as in si()
    for scale, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _layer_total(field: str) -> property:
    """A read-only :class:`Profile` total: the sum of one :class:`OpStats` count over the layers."""

    def total(self: Profile) -> float:
        return sum(getattr(layer, field) for layer in self.layers)

    return property(total, doc=f"sum of ``{field}`` over the layers")


@dataclass
class Profile:
    """Everything :func:`profile_model` measured. Counts are per sample (one input, all ``T`` steps).

    Totals: ``model_size_mb`` (the paper's convention, :mod:`~bestformer.analysis.size`), ``params``,
    ``binary_params``, ``macs`` (every product, dense), ``real_macs`` (products without a spike operand, charged
    at E_MAC), ``sops``, ``energy_pj`` (``E_MAC * real_macs + E_AC * sops``), ``ns_ace``, ``mean_firing_rate``.
    """

    model_name: str
    size: ModelSize
    layers: list[OpStats]
    neurons: list[NeuronStats]
    energy_model: EnergyModel
    fp_bits: int
    firing_rates_measured_on: str
    samples: int
    time_steps: int | None
    representation: list[BlockRepresentation] | None = None

    model_size_mb = property(attrgetter("size.paper_mb"), doc="the paper's model size in MB")
    params = property(attrgetter("size.params"), doc="every parameter")
    binary_params = property(attrgetter("size.binary_params"), doc="weights of 1-bit layers")
    macs = _layer_total("macs")
    real_macs = _layer_total("real_macs")
    sops = _layer_total("sops")
    ns_ace = _layer_total("ns_ace")

    def layer_energy_pj(self, layer: OpStats) -> float:
        return self.energy_model.energy_pj(layer.real_macs, layer.sops)

    @property
    def energy_pj(self) -> float:
        return self.energy_model.energy_pj(self.real_macs, self.sops)

    @property
    def e_mac_share(self) -> float:
        """Fraction of ``energy_pj`` spent on real-valued MACs (``E_MAC * real_macs``): in a spike-driven model
        counted in its deployment form, the share of the first (encoding) layer; 0 for a model without energy."""
        energy = self.energy_pj
        return self.energy_model.e_mac_pj * self.real_macs / energy if energy else 0.0

    @property
    def mean_firing_rate(self) -> float | None:
        """Spikes over neuron outputs of every spiking layer together (``None`` for a model without any)."""
        elements = sum(n.elements for n in self.neurons)
        return sum(n.spikes for n in self.neurons) / elements if elements else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "model_size_mb": self.model_size_mb,
            "params": self.params,
            "binary_params": self.binary_params,
            "macs": self.macs,
            "real_macs": self.real_macs,
            "sops": self.sops,
            "energy_pj": self.energy_pj,
            "e_mac_share": self.e_mac_share,
            "ns_ace": self.ns_ace,
            "firing_rates_measured_on": self.firing_rates_measured_on,
            "mean_firing_rate": self.mean_firing_rate,
            "samples": self.samples,
            "time_steps": self.time_steps,
            "energy_model": self.energy_model.as_dict(),
            "ns_ace_fp_bits": self.fp_bits,
            "size": self.size.as_dict(),
            "deploy_size_bytes": self.size.deploy_bytes,
            "layers": [{**layer.as_dict(), "energy_pj": self.layer_energy_pj(layer)} for layer in self.layers],
            "spiking_layers": [n.as_dict() for n in self.neurons],
            "representation": None if self.representation is None else [r.as_dict() for r in self.representation],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The :meth:`to_dict` data as JSON text; also written (atomically) to ``path`` when given."""
        data = self.to_dict()
        if path is not None:
            atomic_write_json(path, data)
        return json.dumps(data, indent=2)

    def summary(self) -> str:
        """One line of totals (what ``bestformer train`` prints at the end of a run)."""
        return format_summary(self)

    def table(self, layers: bool = True) -> Any:
        """A rich renderable: per-layer table, spiking layers, representation and totals."""
        return profile_tables(self, layers=layers)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG with per-layer firing-rate and energy bars; returns the path."""
        return plot_profile(self, path)


def format_summary(p: Profile) -> str:
    fr = p.mean_firing_rate
    return (
        f"{p.model_name}: {si(p.size.paper_bytes, 'B')} (paper convention), {si(p.params)} params "
        f"({si(p.binary_params)} 1-bit), {si(p.macs)} MACs ({si(p.real_macs)} real-valued), {si(p.sops)} SOPs, "
        f"energy {energy_str(p.energy_pj)} ({p.energy_model.name}, {100 * p.e_mac_share:.1f}% E_MAC), "
        f"NS-ACE {si(p.ns_ace)}"
        + (f", mean firing rate {fr:.4f}" if fr is not None else "")
        + f"; per sample, measured on {p.firing_rates_measured_on} ({p.samples} samples)"
    )


def _layer_table(p: Profile) -> Table:
    t = Table(title=f"{p.model_name}: products per layer (per sample, all {p.time_steps} steps)",
              title_justify="left")
    for col in ("layer", "op", "operands", "b_w", "MACs", "fr", "SOPs", "energy", "NS-ACE"):
        t.add_column(col, justify="left" if col in ("layer", "op", "operands") else "right", no_wrap=True)
    for layer in p.layers:
        fr = layer.firing_rate
        t.add_row(layer.name, layer.op, layer.operands, str(layer.charge_bits), si(layer.macs),
                  "-" if fr is None else f"{fr:.4f}", si(layer.sops) if fr is not None else "-",
                  energy_str(p.layer_energy_pj(layer)), si(layer.ns_ace))
    return t


def _neuron_table(p: Profile) -> Table:
    t = Table(title=f"firing rates per spiking layer (measured on {p.firing_rates_measured_on})",
              title_justify="left")
    t.add_column("spiking layer")
    t.add_column("values")
    t.add_column("firing rate", justify="right")
    for n in p.neurons:
        t.add_row(n.name, n.kind, f"{n.firing_rate:.4f}")
    return t


def _representation_table(p: Profile) -> Table:
    t = Table(title="representation capability per encoder block (value-set size, plug-in entropy)",
              title_justify="left")
    for col in ("block", "set size", "max", "entropy (bits)", "per stream: set size / entropy"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for r in p.representation or []:
        streams = "; ".join(f"{s['set_size']:.1f} / {s['entropy_bits']:.2f}" for s in r.streams)
        t.add_row(r.name, f"{r.set_size:.1f}", str(r.set_size_max), f"{r.entropy_bits:.3f} ± {r.entropy_std:.3f}",
                  streams)
    return t


def _totals_table(p: Profile) -> Table:
    t = Table(title="totals (per sample)", title_justify="left", show_header=False)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    deploy = "-" if p.size.deploy_bytes is None else f"{p.size.deploy_bytes / 1e6:.3f} MB"
    rows = [
        (f"model size (paper convention; full precision at {p.size.fp_bits} bits)", si(p.size.paper_bytes, "B")),
        ("deployment file", deploy),
        ("parameters (1-bit)", f"{p.params:,} ({p.binary_params:,})"),
        ("MACs (real-valued operands)", f"{si(p.macs)} ({si(p.real_macs)})"),
        ("SOPs", si(p.sops)),
        (f"energy ({p.energy_model.name}: E_MAC {p.energy_model.e_mac_pj} pJ, E_AC {p.energy_model.e_ac_pj} pJ)",
         energy_str(p.energy_pj)),
        ("E_MAC share of the energy (real-valued MACs)", f"{100 * p.e_mac_share:.1f}%"),
        (f"NS-ACE (full precision at {p.fp_bits} bits)", si(p.ns_ace)),
        ("mean firing rate", "-" if p.mean_firing_rate is None else f"{p.mean_firing_rate:.4f}"),
        ("firing rates measured on", f"{p.firing_rates_measured_on} ({p.samples} samples)"),
    ]
    for row in rows:
        t.add_row(*row)
    return t


def profile_tables(p: Profile, layers: bool = True) -> Group:
    parts: list[Table] = []
    if layers:
        parts.append(_layer_table(p))
        if p.neurons:
            parts.append(_neuron_table(p))
    if p.representation:
        parts.append(_representation_table(p))
    parts.append(_totals_table(p))
    return Group(*parts)


def plot_profile(p: Profile, path: str | Path) -> Path:
    """Two panels: the firing rate of each spiking layer, and the energy of each product site split into its
    E_MAC (real-valued operands) and E_AC (synaptic operations) parts."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    width = max(8.0, 0.28 * max(len(p.layers), len(p.neurons)))
    fig = Figure(figsize=(width, 9), layout="constrained")
    ax_fr, ax_e = fig.subplots(2, 1)
    names = [n.name for n in p.neurons]
    ax_fr.bar(range(len(names)), [n.firing_rate for n in p.neurons], color="tab:blue")
    ax_fr.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax_fr.set_ylabel("firing rate")
    ax_fr.set_title(f"{p.model_name}: firing rate per spiking layer (measured on {p.firing_rates_measured_on})")
    em = p.energy_model
    mac_part = [em.e_mac_pj * layer.real_macs / 1e6 for layer in p.layers]
    ac_part = [em.e_ac_pj * layer.sops / 1e6 for layer in p.layers]
    xs = range(len(p.layers))
    ax_e.bar(xs, mac_part, color="tab:red", label=f"E_MAC x real MACs ({em.e_mac_pj} pJ)")
    ax_e.bar(xs, ac_part, bottom=mac_part, color="tab:green", label=f"E_AC x SOPs ({em.e_ac_pj} pJ)")
    ax_e.set_xticks(list(xs), [layer.name for layer in p.layers], rotation=90, fontsize=7)
    ax_e.set_ylabel("energy per sample (µJ)")
    ax_e.set_title(f"energy per layer, total {energy_str(p.energy_pj)} ({em.name})")
    ax_e.legend()
    return save_png(fig, path, dpi=110)


def save_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG, atomically (a reader never sees half a file);
    returns the path. Shared by every plot of the library."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
