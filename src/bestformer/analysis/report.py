"""Presentation of a :class:`~bestformer.analysis.profile.Profile`: a one-line summary, rich tables, a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table

from ..fileio import atomic_path

if TYPE_CHECKING:
    from .profile import Profile

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'`` (decimal prefixes, three significant digits)."""
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def energy_str(pj: float) -> str:
    """Energy given in picojoules, in the most readable unit."""
    for scale, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def format_summary(p: Profile) -> str:
    fr = p.mean_firing_rate
    return (
        f"{p.model_name}: {si(p.size.paper_bytes, 'B')} (paper convention), {si(p.params)} params "
        f"({si(p.binary_params)} 1-bit), {si(p.macs)} MACs ({si(p.real_macs)} real-valued), {si(p.sops)} SOPs, "
        f"energy {energy_str(p.energy_pj)} ({p.energy_model.name}), NS-ACE {si(p.ns_ace)}"
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
        ("model size (paper convention)", si(p.size.paper_bytes, "B")),
        ("deployment file", deploy),
        ("parameters (1-bit)", f"{p.params:,} ({p.binary_params:,})"),
        ("MACs (real-valued operands)", f"{si(p.macs)} ({si(p.real_macs)})"),
        ("SOPs", si(p.sops)),
        (f"energy ({p.energy_model.name}: E_MAC {p.energy_model.e_mac_pj} pJ, E_AC {p.energy_model.e_ac_pj} pJ)",
         energy_str(p.energy_pj)),
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

    path = Path(path)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
