"""CSDformer (seed 004) conversion as one namespace: ``convert`` (a trained ``csd_*`` ANN into its fully
spike-driven model: IF / delayed IF neurons, temporal decomposition, BatchNorm folding) and the error analysis of
a conversion (``report``).

The parts live where they belong in the layering: the converted model and ``convert`` with the family
(``bestformer.models.csd``), the neurons in ``neurons``, the quantized activations in ``quant``, the temporal
decomposition and BatchNorm folding in ``layers``; they are re-exported here, their public home before.
"""

from ..layers.decompose import SpikeMaxPool2d, spike_matmul, spike_maxpool2d
from ..layers.fold import fold_bn  # re-exported (as all below): this package's API before they moved
from ..models.csd import SpikingCSD, convert
from ..neurons import IFNeuron, if_neuron
from ..quant import QuantNReLU, QuantReLU
from .report import ConversionResult, conversion_errors, plot_delay_sweep, sweep_delays

__all__ = [
    "ConversionResult",
    "IFNeuron",
    "QuantNReLU",
    "QuantReLU",
    "SpikeMaxPool2d",
    "SpikingCSD",
    "conversion_errors",
    "convert",
    "fold_bn",
    "if_neuron",
    "plot_delay_sweep",
    "spike_matmul",
    "spike_maxpool2d",
    "sweep_delays",
]
