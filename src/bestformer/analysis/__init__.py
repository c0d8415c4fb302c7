"""Efficiency accounting of any registered model: model size (BESTformer Table 2 convention and the deployment
file), MACs and SOPs per layer, energy, NS-ACE (Table 3), firing rates, and the representation capability of
encoder blocks (Fig. 2 / 5b). ``profile_model`` runs them all; ``bestformer profile`` is its command line."""

from .energy import ENERGY_PRESETS, EnergyModel, get_energy_model
from .ops import OpCounter
from .precision import FP_BITS
from .profile import profile_model
from .report import Profile
from .representation import BlockRepresentation, RepresentationProbe, value_entropy, value_set_size
from .size import ModelSize, model_size
from .stats import NeuronStats, OpStats
from .values import ValueKind, classify_values

__all__ = [
    "ENERGY_PRESETS",
    "FP_BITS",
    "BlockRepresentation",
    "EnergyModel",
    "ModelSize",
    "NeuronStats",
    "OpCounter",
    "OpStats",
    "Profile",
    "RepresentationProbe",
    "ValueKind",
    "classify_values",
    "get_energy_model",
    "model_size",
    "profile_model",
    "value_entropy",
    "value_set_size",
]
