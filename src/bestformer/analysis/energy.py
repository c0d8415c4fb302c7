"""Energy per operation: the field's estimate ``E = E_MAC * MACs(real-valued operands) + E_AC * SOPs``.

All presets come from one table, Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014 (45 nm, 0.9 V): a MAC costs one multiplication plus one addition, an accumulate (AC) one addition.

========  =====================  ==================  ===================================================
preset    E_MAC (pJ)             E_AC (pJ)           from Horowitz's table
========  =====================  ==================  ===================================================
``45nm``  4.6 = 3.7 + 0.9        0.9                 32-bit float mult 3.7, add 0.9 (Spikformer, Spike-
                                                     driven Transformer, QSD-Transformer use these)
``fp16``  1.5 = 1.1 + 0.4        0.4                 16-bit float mult 1.1, add 0.4
``int8``  0.23 = 0.2 + 0.03      0.03                8-bit integer mult 0.2, add 0.03
========  =====================  ==================  ===================================================

The fp16 and int8 pairs are also the ones tabulated by SpikingJelly's energy counter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import check_choice


@dataclass(frozen=True)
class EnergyModel:
    """Energy of one multiply-accumulate (``e_mac_pj``) and one accumulate (``e_ac_pj``), in picojoules."""

    name: str
    e_mac_pj: float
    e_ac_pj: float
    source: str

    def energy_pj(self, real_macs: float, sops: float) -> float:
        """``E_MAC * MACs(real-valued operands) + E_AC * SOPs``."""
        return self.e_mac_pj * real_macs + self.e_ac_pj * sops

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_HOROWITZ = "Horowitz, ISSCC 2014, 45 nm"
ENERGY_PRESETS: dict[str, EnergyModel] = {
    "45nm": EnergyModel("45nm", 4.6, 0.9, f"{_HOROWITZ}: fp32 mult 3.7 + add 0.9; add 0.9"),
    "fp16": EnergyModel("fp16", 1.5, 0.4, f"{_HOROWITZ}: fp16 mult 1.1 + add 0.4; add 0.4"),
    "int8": EnergyModel("int8", 0.23, 0.03, f"{_HOROWITZ}: int8 mult 0.2 + add 0.03; add 0.03"),
}


def get_energy_model(spec: str | EnergyModel) -> EnergyModel:
    """A preset by name (``"45nm"``, ``"fp16"``, ``"int8"``) or an :class:`EnergyModel` of your own."""
    if isinstance(spec, EnergyModel):
        return spec
    return ENERGY_PRESETS[check_choice("energy preset", spec, ENERGY_PRESETS)]
