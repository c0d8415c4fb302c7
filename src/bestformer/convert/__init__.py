"""CSDformer (seed 004): quantized activations for training, and the conversion of a trained ``csd_*`` ANN into
a fully spike-driven model (IF / delayed IF neurons, temporal decomposition, BatchNorm folding)."""

from .activation import QuantNReLU, QuantReLU
from .converter import convert
from .decompose import SpikeMaxPool2d, spike_matmul, spike_maxpool2d
from .neurons import IFNeuron, if_neuron
from .report import ConversionResult, conversion_errors, plot_delay_sweep, sweep_delays
from .spiking import SpikingCSD, fold_bn

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
