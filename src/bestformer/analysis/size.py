"""Model size: the paper's convention (Table 2) and the bytes of the actual deployment file.

Paper convention (BESTformer Table 2, MB = 10^6 bytes), generalised to every family by reading each layer's
bit-width from the layer (:func:`bestformer.quant.weight_bits_of`), with the bits of
:mod:`~bestformer.analysis.precision`:

- a quantized model (any layer below 32 bits): the weight of every convolution and linear layer at its own
  bit-width (1 for Eq. 5-6 weights, b for LSQ; the full-precision ones, the first convolution and the head in
  BESTformer, at 32 bits), its bias at 32 bits; ONE classification head: a distillation head (timm/DeiT's
  ``head_dist``) is left out, as in the paper; every other parameter (BatchNorm, the lambda of Eq. 9, LSQ step
  sizes, layer scales, neuron amplitudes) is a per-channel or per-step constant that folds into the thresholds
  and biases at deployment and is not counted (reported as ``other_params``);
- a full-precision model (the baselines of Table 2): every parameter at ``fp_bits`` (16), the papers'
  ``#Param x 16 bit`` (Spikformer-8-512: 29.68 M parameters, 59.36 MB).

This gives 1.18 MB (bestformer_4_384, 10 classes), 1.32 MB (100 classes; the paper prints 1.31),
0.74 MB (bestformer_2_384; 0.73) and 0.33 MB (bestformer_2_256; 0.34), each within 0.01 MB of Table 2, and
59.33 MB for our spikformer_8_512 (29.66 M parameters; Table 2: 59.36 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..quant import weight_bits_of
from .precision import FP_BITS, FULL_PRECISION, MIXED_FP_BITS, check_fp_bits

#: Module names of distillation heads, left out of the paper's size (DeiT / timm name it ``head_dist``).
DISTILL_HEADS = ("head_dist",)
BIAS_BITS = MIXED_FP_BITS
MB = 1e6


def is_distill_head(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in DISTILL_HEADS)


@dataclass
class ModelSize:
    """Sizes of a model.

    Attributes:
        paper_bytes: the paper's convention (module docstring); ``paper_mb = paper_bytes / 1e6``.
        params: every parameter; binary_params: weights of 1-bit layers.
        params_by_bits: weight-layer parameters per bit-width (biases under 32), distillation head excluded.
        other_params: parameters outside weight layers (folded away in the paper's convention).
        excluded_heads: the distillation heads left out.
        fp_bits: bits per parameter of a full-precision model (16).
        deploy_bytes: bytes of the file written by ``bestformer.deploy.export_packed`` (None when that module
            is not loaded or cannot export this model; ``deploy_note`` says why).
    """

    paper_bytes: float
    params: int
    binary_params: int
    params_by_bits: dict[int, int] = field(default_factory=dict)
    other_params: int = 0
    excluded_heads: list[str] = field(default_factory=list)
    fp_bits: int = FP_BITS
    deploy_bytes: int | None = None
    deploy_note: str = ""

    @property
    def paper_mb(self) -> float:
        return self.paper_bytes / MB

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["paper_mb"] = self.paper_mb
        d["params_by_bits"] = {str(k): v for k, v in sorted(self.params_by_bits.items())}
        return d


#: measures a model's deployment file: ``(bytes, note)``, or ``(None, reason)`` when it cannot be written
DeployMeasure = Callable[[nn.Module], tuple[int | None, str]]
_deploy_measure: DeployMeasure | None = None


def register_deploy_measure(measure: DeployMeasure) -> None:
    """Let :func:`model_size` measure the deployment file with ``measure``. ``bestformer.deploy.fold`` registers
    the size of its packed file when it is imported (analysis sits below deploy, so it cannot import it)."""
    global _deploy_measure
    _deploy_measure = measure


def deploy_file_bytes(model: nn.Module) -> tuple[int | None, str]:
    """Size of the deployment file of ``model`` and a note, by the registered measure; ``(None, reason)`` when
    none is registered or the file cannot be written."""
    if _deploy_measure is None:
        return None, "bestformer.deploy not loaded (import bestformer.deploy.fold to measure the deployment file)"
    return _deploy_measure(model)


def model_size(model: nn.Module, deploy: bool = True, fp_bits: int = FP_BITS) -> ModelSize:
    """Count the sizes of ``model`` (see the module docstring); ``fp_bits``: bits per parameter of a
    full-precision model; ``deploy=False`` skips the export (which needs ``bestformer.deploy.fold`` loaded:
    :func:`register_deploy_measure`)."""
    check_fp_bits(fp_bits)
    heads = [(name, m) for name, m in model.named_modules() if name in DISTILL_HEADS]
    skipped = {id(p) for _, m in heads for p in m.parameters()}
    counted: set[int] = set()  # ids of the parameters the paper's convention stores
    bits = 0
    by_bits: dict[int, int] = {}
    for name, module in model.named_modules():
        weight_bits = weight_bits_of(module)
        if weight_bits is None or is_distill_head(name):
            continue
        counted.update(id(p) for p in module.parameters(recurse=False))
        bits += weight_bits * module.weight.numel()
        by_bits[weight_bits] = by_bits.get(weight_bits, 0) + module.weight.numel()
        bias = getattr(module, "bias", None)
        if bias is not None:
            bits += BIAS_BITS * bias.numel()
            by_bits[BIAS_BITS] = by_bits.get(BIAS_BITS, 0) + bias.numel()
    params = list(model.parameters())
    if by_bits and min(by_bits) >= FULL_PRECISION:  # a full-precision model: every parameter at fp_bits
        bits = fp_bits * sum(p.numel() for p in params if id(p) not in skipped)
    size = ModelSize(
        paper_bytes=bits / 8,
        params=sum(p.numel() for p in params),
        binary_params=sum(m.weight.numel() for m in model.modules() if weight_bits_of(m) == 1),
        params_by_bits=by_bits,
        other_params=sum(p.numel() for p in params if id(p) not in counted and id(p) not in skipped),
        excluded_heads=[name for name, _ in heads],
        fp_bits=fp_bits,
    )
    if deploy:
        size.deploy_bytes, size.deploy_note = deploy_file_bytes(model)
    return size
