"""Folding a trained 1-bit model into what the packed runtime computes: the paper's lambda "can be incorporated
into the firing threshold during inference", and BatchNorm folds likewise. What is exact, and what we do:

**BatchNorm after a binary layer.** In eval mode ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta`` on the
integer ``z = W s``. It folds into one per-channel scale and bias, ``X = alpha z + b`` with
``alpha = gamma / sqrt(var + eps)`` and ``b = beta - mu alpha``, which the LIF then charges with.

In exact arithmetic the scale could go into the threshold too: with ``V_reset = 0`` the LIF is positively
homogeneous, so dividing ``X``, ``V`` and ``V_th`` by ``|alpha|`` gives ``X' = sign(alpha) z + b/|alpha|`` against
``V_th / |alpha|`` (a negative gamma flips the comparison, or equivalently the channel's weight signs), and with
``tau = 2`` the membrane ``k`` steps after a reset is ``alpha M / 2^k + b (1 - 2^-k)`` with the integer
``M = sum_i z_i 2^(i-1)``, so the spike condition is the integer test ``M >= ceil(((V_th - b) 2^k + b) / alpha)``
(``alpha > 0``; ``<=`` with ``floor`` for ``alpha < 0``): ``T`` integer thresholds per channel. We do not use that
form: PyTorch computes ``X`` in float32 (``fma(z, alpha, b)`` on x86 CPUs) and rounds the membrane at every step,
so the exact-arithmetic thresholds disagree with the trained model wherever the membrane lands within a rounding
error of the threshold. The runtime instead keeps ``alpha`` and ``b`` as float32, computed bit-for-bit as PyTorch
does (``b`` is read back as ``BN(0)``), evaluates ``X`` with the same single rounding and runs the membrane in
float32 with PyTorch's operation order. :func:`fold_batchnorm` checks this on every integer ``z`` the layer can
produce (``|z| <= fan-in``), so the folded model's spikes equal the PyTorch model's by construction, not by luck.

**lambda and 0.125.** The attention output is ``Y = (B_Attn V) * (lambda * 0.125)``: the product
``lambda[t, head] * 0.125`` is folded into one constant per time step and head (exact: a power-of-two scaling),
applied to the integer count ``B_Attn V`` with PyTorch's single rounding. (Into the threshold it would go as
``V_th / c_t`` with a per-step leak ``c_(t-1) / (tau c_t)``, exact only in real arithmetic, as above.)

**The first layer** (full precision) keeps its BatchNorm as the same per-channel affine (folding it into the
convolution's weights would add a rounding PyTorch does not make).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis.size import register_deploy_measure
from ..errors import BestformerError, ConfigError
from ..layers import SpikingMLP, SpikingSelfAttention
from ..layers.basic import ConvBN, LinearBN
from ..layers.fold import bn_eval
from ..layers.fold import bn_kernel_constants as bn_constants  # the name deploy's users import
from ..models import SpikingTransformer
from ..neurons import LIF
from ..quant import QuantMixin
from ..version import __version__
from . import kernels as K
from .packfile import FLOAT_DTYPES, PackedModelData, write_packed


def _float_weight(layer: nn.Module) -> np.ndarray:
    with torch.no_grad():
        w = layer.quantized_weight() if isinstance(layer, QuantMixin) else layer.weight
        return w.detach().cpu().float().numpy().copy()


def binary_signs(layer: nn.Module) -> np.ndarray:
    """The +-1 weights (int8) of a 1-bit layer (Eq. 5-6: +1 where the standardized weight is >= 0)."""
    q = getattr(layer, "weight_quantizer", None)
    if q is None or q.precision != 1:
        raise ConfigError(f"{type(layer).__name__} is not a 1-bit layer "
                          f"(weight_bits={getattr(layer, 'weight_bits', 32)})")
    codes, _ = q.codes(layer.weight.detach().cpu().float())
    return codes.numpy().astype(np.int8)


def _probe(bn: nn.modules.batchnorm._BatchNorm, values: np.ndarray) -> np.ndarray:
    """PyTorch's BN on ``values [L, C]`` in the layout the model calls it with: ``[L, C]`` for tokens (BN1d),
    ``[1, C, 1, L]`` for feature maps (BN2d: the same vectorised path as ``[T*B, C, H, W]``)."""
    x = torch.from_numpy(values)
    with torch.no_grad():
        if isinstance(bn, nn.BatchNorm2d):
            return bn_eval(bn, x.t().reshape(1, -1, 1, x.shape[0])).reshape(x.shape[1], -1).t().numpy()
        return bn_eval(bn, x).numpy()


def fold_batchnorm(bn: nn.modules.batchnorm._BatchNorm, fan_in: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Fold ``bn`` into ``(alpha, b, rounding)`` and check it against PyTorch bit for bit.

    ``fan_in``: the layer's inputs per output for a binary layer (every integer ``|z| <= fan_in`` is checked);
    ``None`` for the full-precision first layer (checked on 4096 random values per channel). ``rounding`` is
    ``"fma"`` or ``"mul_add"``, whichever reproduces PyTorch on this machine; a mismatch of both warns (the spikes
    can then differ from PyTorch where the membrane is within a rounding error of the threshold).
    """
    alpha, beta = bn_constants(bn)
    c = alpha.shape[0]
    if fan_in is None:
        gen = np.random.default_rng(0)
        z = (gen.standard_normal((4096, c)) * 8).astype(np.float32)
    else:
        z = np.repeat(np.arange(-fan_in, fan_in + 1, dtype=np.float32)[:, None], c, axis=1)
    want = _probe(bn, z)
    for rounding in ("fma", "mul_add"):
        if np.array_equal(K.affine(z, alpha, beta, rounding == "fma"), want):
            return alpha, beta, rounding
    warnings.warn("BatchNorm folding does not reproduce this PyTorch build's rounding exactly; packed spikes may "
                  "differ from PyTorch at exact threshold ties", RuntimeWarning, stacklevel=2)
    return alpha, beta, "fma"


def neuron_modules(model: SpikingTransformer) -> dict[str, str]:
    """Packed-file neuron name -> the PyTorch module path of that LIF (``stem.0`` -> ``patch_embed.stages.0.0``)."""
    names = {f"stem.{i}": f"patch_embed.stages.{i}.0" for i in range(len(model.patch_embed.stages))}
    for j in range(len(model.blocks)):
        names.update({f"b{j}.{n}": f"blocks.{j}.attn.{n}_neuron" for n in ("in", "q", "k", "v", "attn", "out")})
        names.update({f"b{j}.n1": f"blocks.{j}.mlp.neuron1", f"b{j}.n2": f"blocks.{j}.mlp.neuron2"})
    return names


def _lif(neuron: nn.Module, name: str) -> dict[str, Any]:
    if not isinstance(neuron, LIF):
        raise ConfigError(f"packed export needs LIF neurons; {name} is {type(neuron).__name__}")
    p = neuron.params
    return {"tau": p.tau, "v_threshold": p.v_threshold, "v_reset": p.v_reset, "reset": p.reset,
            "decay_input": p.decay_input}


def check_packable(model: nn.Module) -> SpikingTransformer:
    """The model families the packed format covers, with a one-line reason otherwise."""
    if not isinstance(model, SpikingTransformer):
        raise ConfigError(f"packed export supports SpikingTransformer models (bestformer_*), got "
                          f"{type(model).__name__}")
    if model.weight_bits != 1:
        raise ConfigError(f"packed export needs 1-bit weights (weight_bits=1), this model has weight_bits="
                          f"{model.weight_bits}; export a bestformer_* model")
    if model.attention not in ("token", "channel"):
        why = {"ssa": "its attention map Q K^T is an integer matrix, not binary",
               "a2os2a": "its K branch is real-valued (ReLU), so Q K^T is a float sum whose rounding depends on the "
                         "summation order and could not reproduce PyTorch's spikes exactly"}.get(
            model.attention.split("_")[0], "it is not a binary attention form")
        raise ConfigError(f"packed export supports the binary attention forms 'token' and 'channel', this model "
                          f"uses {model.attention!r} ({why})")
    if model.num_classes < 1:
        raise ConfigError("packed export needs a classifier head (num_classes >= 1)")
    for blk in model.blocks:
        if not isinstance(blk.attn, SpikingSelfAttention) or not isinstance(blk.mlp, SpikingMLP):
            raise ConfigError(f"packed export cannot fold block layers {type(blk.attn).__name__} / "
                              f"{type(blk.mlp).__name__}")
    return model


def fold_model(model: nn.Module, float_dtype: str = "float32") -> PackedModelData:
    """Fold a 1-bit :class:`~bestformer.models.SpikingTransformer` into the packed runtime's tensors.

    Returns +-1 (int8) weights for binary layers, float32 per-channel ``[alpha, b]`` (``X.bn``, ``[2, C]``) for
    every BatchNorm, the
    folded attention constants ``lambda * 0.125`` ``[T, heads]`` per block, the first convolution and the heads
    (float), and every LIF's parameters. The model is not modified.
    """
    m = check_packable(model)
    if float_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {float_dtype!r}")
    d = m.embed_dim
    pe = m.patch_embed
    tensors: dict[str, np.ndarray] = {}
    neurons: dict[str, dict[str, Any]] = {}
    roundings: set[str] = set()

    def add_bn(prefix: str, bn: nn.Module, fan_in: int | None) -> None:
        alpha, beta, rounding = fold_batchnorm(bn, fan_in)
        roundings.add(rounding)
        tensors[f"{prefix}.bn"] = np.stack([alpha, beta])  # [2, C]: scale, bias

    tensors["stem.conv.w"] = _float_weight(pe.proj.conv)
    add_bn("stem.conv", pe.proj.bn, None)
    modules = dict(m.named_modules())
    for short, path in neuron_modules(m).items():
        neurons[short] = _lif(modules[path], path)
    for i, stage in enumerate(pe.stages):
        conv_bn: ConvBN = stage[-1]
        tensors[f"stem.{i}.w"] = binary_signs(conv_bn.conv).transpose(0, 2, 3, 1).copy()  # [O, 3, 3, C_in]
        add_bn(f"stem.{i}", conv_bn.bn, 9 * conv_bn.conv.in_channels)
    for j, blk in enumerate(m.blocks):
        attn, mlp = blk.attn, blk.mlp
        pre = f"blocks.{j}"
        proj: LinearBN
        for short, proj in (("q", attn.q), ("k", attn.k), ("v", attn.v), ("o", attn.proj),
                            ("fc1", mlp.fc1), ("fc2", mlp.fc2)):
            if proj.linear.bias is not None:
                raise ConfigError(f"packed export expects bias-free binary projections ({pre} {short} has a bias)")
            tensors[f"b{j}.{short}.w"] = binary_signs(proj.linear)
            add_bn(f"b{j}.{short}", proj.bn, proj.linear.in_features)
        with torch.no_grad():  # the same float32 product as the model's forward
            scale = (attn.lam * attn.attn_scale).detach().cpu().float()
        # the first T rows: a model run at fewer steps than it was built with (set_time_steps) uses lambda[:T]
        tensors[f"b{j}.scale"] = scale.reshape(scale.shape[0], scale.shape[2])[:m.time_steps].numpy()
    for name in ("head", "head_dist") if m.head_dist is not None else ("head",):
        layer = getattr(m, name)
        tensors[f"{name}.w"] = _float_weight(layer)
        tensors[f"{name}.b"] = layer.bias.detach().cpu().float().numpy() if layer.bias is not None else \
            np.zeros(m.num_classes, np.float32)
    arch = {
        "in_channels": m.in_channels, "img_size": m.img_size, "time_steps": m.time_steps, "embed_dim": d,
        "depth": len(m.blocks), "num_heads": m.blocks[0].attn.heads if len(m.blocks) else 1,
        "mlp_hidden": m.blocks[0].mlp.fc1.linear.out_features if len(m.blocks) else 4 * d,
        "num_classes": m.num_classes, "attention": m.attention, "reversible": bool(m.reversible),
        "distill_head": m.head_dist is not None, "pool_stages": [bool(p) for p in pe.pool_stages],
        "stem_widths": [pe.proj.conv.out_channels] + [stage[-1].conv.out_channels for stage in pe.stages],
    }
    if len(roundings) > 1:
        warnings.warn("BatchNorm layers of this model round differently in PyTorch (fma and mul_add); packed spikes "
                      "may differ from PyTorch at exact threshold ties", RuntimeWarning, stacklevel=2)
    bn = "mul_add" if roundings == {"mul_add"} else "fma"
    return PackedModelData(arch=arch, neurons=neurons, tensors=tensors, bn=bn,
                           float_dtype=FLOAT_DTYPES[float_dtype])


def export_packed(model: nn.Module, path: str | Path, dtype: str = "float32") -> Path:
    """Write ``model`` (a 1-bit SpikingTransformer) as a packed ``.bst`` file; returns the path.

    ``dtype`` is the storage of the full-precision tensors (first convolution, folded BatchNorms, attention
    constants, heads): ``"float32"`` reproduces the PyTorch model's spikes exactly, ``"float16"`` halves them
    (the paper's 1.18 MB size convention is met only with float16, see docs/deploy.md) at the price of exactness.
    """
    data = fold_model(model, dtype)
    return write_packed(data, path, library_version=__version__, model_name=getattr(model, "model_name", ""),
                        model_args=getattr(model, "model_args", {}))


def deploy_file_bytes(model: nn.Module) -> tuple[int | None, str]:
    """Size of the packed file of ``model`` with the default options and a note; ``(None, reason)`` when it
    cannot be written. Registered with :func:`bestformer.analysis.size.register_deploy_measure` below, so that
    ``model_size`` and ``profile_model`` report it once this module is loaded."""
    with tempfile.TemporaryDirectory(prefix="bestformer-size-") as tmp:
        path = Path(tmp) / "model.bst"
        try:
            export_packed(model, path)
        except BestformerError as err:
            return None, f"export_packed cannot write this model: {err}"
        return path.stat().st_size, "bestformer.deploy.export_packed with its default options"


register_deploy_measure(deploy_file_bytes)
