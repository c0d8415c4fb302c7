"""Export to NIR, the Neuromorphic Intermediate Representation (Pedersen et al., Nat. Commun. 2024; PyPI ``nir``).

NIR describes continuous-time nodes; a graph runs on a simulator with a time step ``dt`` of its choice. One time
step of our models is one ``dt`` (default ``1e-4`` s, the step snnTorch's importer assumes). What maps, and how:

- ``LIF`` (hard reset) -> ``nir.LIF`` with ``tau = tau_steps * dt``, ``v_leak = v_reset``, ``v_reset``,
  ``v_threshold`` and ``r = 1`` (``decay_input=True``: NIR's forward-Euler step
  ``v += dt/tau (v_leak - v + r I)`` is then exactly our charge ``H = V + (X - (V - V_reset)) / tau``) or
  ``r = tau_steps`` (``decay_input=False``: ``H = beta (V - V_reset) + V_reset + X`` with ``beta = 1 - 1/tau``).
  ``tau = inf`` (an IF neuron) -> ``nir.IF`` with ``r = 1 / dt``. NIR fires on ``v > v_threshold``, our LIF on
  ``v >= v_threshold``: the two differ only when the membrane equals the threshold exactly. A soft-reset LIF has
  no NIR counterpart (NIR resets to ``v_reset``).
- ``ConvBN`` / ``LinearBN`` (binary or not) -> ``nir.Conv2d`` / ``nir.Affine`` with the BatchNorm folded into the
  weights and bias (NIR has no normalisation node): ``W' = alpha W``, ``b' = beta - mu alpha``.
- ``TimeMaxPool2d`` after spiking neurons -> ``nir.SumPool2d(3, 2, 1)`` then ``nir.Threshold(0)``: on binary
  spikes the maximum of a window is 1 exactly when its sum is > 0 (NIR has no max pooling).
- residual additions (``ResidualBlock``) -> several edges into one node (NIR sums a node's inputs).
- ``PatchSplitting`` (the BSPS stem) is a spiking CNN and exports whole (per-step input ``[C, H, W]``, output the
  feature map ``[D, H', W']``; our tokens are its flattened transpose). ``SpikingMLP`` exports per token
  (input and output ``[D]``).

Spiking self-attention does not map: NIR has no product of two activations (``Q K^T``, ``Attn V``), so a
SpikingTransformer fails with a message naming those operations, or (``subgraphs=True``) exports the stem, every
block's MLP and the heads as separate sub-graphs of one file, without edges between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, FileFormatError
from ..fileio import atomic_path
from ..layers import PatchSplitting, ResidualBlock, ReversibleBlock, SpikingMLP, SpikingSelfAttention, TimeMaxPool2d
from ..layers.basic import ConvBN, LinearBN
from ..layers.fold import fold_bn
from ..models import SpikingTransformer
from ..neurons import LIF
from ..quant import QuantMixin

#: the operations of spiking self-attention that NIR cannot express
ATTENTION_OPS = ("Q K^T and Attn V (products of two activations)", "the SR-LIF binarization of that product",
                 "the per-head split and merge")


class NIRUnsupported(ConfigError):
    """A module (or a part of it) has no NIR counterpart."""


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _weight(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return (layer.quantized_weight() if isinstance(layer, QuantMixin) else layer.weight).detach()


def _bn_fold(bn: nn.modules.batchnorm._BatchNorm, w: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``BN(W x + b) = (alpha W) x + (alpha (b - mu) + beta)`` in the weights' dtype (:func:`fold_bn`)."""
    with torch.no_grad():
        w2, b2 = fold_bn(w, bias, bn, dtype=w.dtype)
    return _np(w2), _np(b2)


class _Graph:
    """Nodes and edges under construction. A value is a list of node names whose outputs NIR sums."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.spiking: set[str] = set()  # nodes whose output is binary (LIF, Threshold)

    def add(self, name: str, node: Any, inputs: Sequence[str], spiking: bool = False) -> list[str]:
        if name in self.nodes:
            raise AssertionError(f"duplicate NIR node {name}")
        self.nodes[name] = node
        self.edges.extend((src, name) for src in inputs)
        if spiking:
            self.spiking.add(name)
        return [name]


def _lif_node(neuron: LIF, shape: tuple[int, ...], dt: float, name: str) -> Any:
    p = neuron.params
    if p.reset != "hard":
        raise NIRUnsupported(f"{name}: soft-reset LIF (V -= V_th after a spike) has no NIR counterpart "
                             "(NIR's LIF resets to v_reset)")

    def full(v: float) -> np.ndarray:
        return np.full(shape, v, dtype=np.float64)

    if math.isinf(p.tau):  # IF neuron: H = V + X
        return nir.IF(r=full(1.0 / dt), v_threshold=full(p.v_threshold), v_reset=full(p.v_reset))
    r = 1.0 if p.decay_input else p.tau
    return nir.LIF(tau=full(p.tau * dt), r=full(r), v_leak=full(p.v_reset), v_threshold=full(p.v_threshold),
                   v_reset=full(p.v_reset))


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _emit(g: _Graph, module: nn.Module, name: str, inputs: list[str], shape: tuple[int, ...], dt: float
          ) -> tuple[list[str], tuple[int, ...]]:
    """Add ``module`` fed by ``inputs`` (per-step shape ``shape``); return its output value and shape. ``name`` is
    the module's path ("" for the root; a root leaf is named after its type)."""
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            inputs, shape = _emit(g, child, _join(name, child_name), inputs, shape, dt)
        return inputs, shape
    if not name and not isinstance(module, (PatchSplitting, SpikingMLP, ResidualBlock)):
        name = type(module).__name__.lower()
    if isinstance(module, LIF):
        return g.add(name, _lif_node(module, shape, dt, name), inputs, spiking=True), shape
    if isinstance(module, ConvBN):
        conv = module.conv
        if tuple(conv.stride) != (1, 1) or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise NIRUnsupported(f"{name}: only stride-1, dense, undilated ConvBN layers are exported")
        w, b = _bn_fold(module.bn, _weight(conv), conv.bias)
        node = nir.Conv2d(input_shape=shape[1:], weight=w, stride=1, padding=tuple(conv.padding), dilation=1,
                          groups=1, bias=b)
        return g.add(name, node, inputs), tuple(int(s) for s in node.output_type["output"])
    if isinstance(module, LinearBN):
        w, b = _bn_fold(module.bn, _weight(module.linear), module.linear.bias)
        return g.add(name, nir.Affine(weight=w, bias=b), inputs), (w.shape[0],)
    if isinstance(module, nn.Conv2d):
        w = _np(_weight(module))
        b = _np(module.bias) if module.bias is not None else np.zeros(w.shape[0], w.dtype)
        node = nir.Conv2d(input_shape=shape[1:], weight=w, stride=tuple(module.stride), padding=tuple(module.padding),
                          dilation=tuple(module.dilation), groups=module.groups, bias=b)
        return g.add(name, node, inputs), tuple(int(s) for s in node.output_type["output"])
    if isinstance(module, nn.Linear):
        w = _np(_weight(module))
        node = nir.Affine(weight=w, bias=_np(module.bias)) if module.bias is not None else nir.Linear(weight=w)
        return g.add(name, node, inputs), (w.shape[0],)
    if isinstance(module, TimeMaxPool2d):
        if not inputs or any(src not in g.spiking for src in inputs):
            raise NIRUnsupported(f"{name}: max pooling is exported as sum pooling + threshold, exact only on binary "
                                 "spikes; here its input is real-valued")
        c, h, w = shape
        out = (c, (h - 1) // 2 + 1, (w - 1) // 2 + 1)
        pooled = g.add(_join(name, "sum"), nir.SumPool2d(kernel_size=np.array([3, 3]), stride=np.array([2, 2]),
                                                    padding=np.array([1, 1])), inputs)
        return g.add(name, nir.Threshold(threshold=np.zeros(out)), pooled, spiking=True), out
    if isinstance(module, PatchSplitting):
        inputs, shape = _emit(g, module.proj, _join(name, "proj"), inputs, shape, dt)
        for i, stage in enumerate(module.stages):
            inputs, shape = _emit(g, stage, _join(name, f"stages.{i}"), inputs, shape, dt)
        return inputs, shape
    if isinstance(module, SpikingMLP):
        for child in ("neuron1", "fc1", "neuron2", "fc2"):
            inputs, shape = _emit(g, getattr(module, child), _join(name, child), inputs, shape, dt)
        return inputs, shape
    if isinstance(module, ResidualBlock):
        branch, _ = _emit(g, module.attn, _join(name, "attn"), inputs, shape, dt)
        mid = inputs + branch  # x + attn(x): both edge sets feed every consumer
        branch, _ = _emit(g, module.mlp, _join(name, "mlp"), mid, shape, dt)
        return mid + branch, shape
    if isinstance(module, SpikingSelfAttention):
        raise NIRUnsupported(f"{name}: spiking self-attention is not expressible in NIR: " + "; ".join(ATTENTION_OPS))
    if isinstance(module, ReversibleBlock):
        raise NIRUnsupported(f"{name}: a reversible block contains spiking self-attention, not expressible in NIR: "
                             + "; ".join(ATTENTION_OPS))
    raise NIRUnsupported(f"{name or 'model'}: {type(module).__name__} has no NIR export (supported: LIF, ConvBN, "
                         "LinearBN, Conv2d, Linear, TimeMaxPool2d, PatchSplitting, SpikingMLP, ResidualBlock, "
                         "nn.Sequential)")


def _graph(module: nn.Module, input_shape: tuple[int, ...], dt: float) -> Any:
    g = _Graph()
    shape = tuple(int(s) for s in input_shape)
    inputs = g.add("input", nir.Input(input_type={"input": np.array(shape)}), [])
    out, out_shape = _emit(g, module, "", inputs, shape, dt)
    g.add("output", nir.Output(output_type={"output": np.array(out_shape)}), out)
    return nir.NIRGraph(nodes=g.nodes, edges=g.edges, metadata={"source": "bestformer", "dt": dt})


def to_nir(module: nn.Module, input_shape: Sequence[int] | None = None, subgraphs: bool = False,
           dt: float = 1e-4) -> Any:
    """The ``nir.NIRGraph`` of ``module``.

    Args:
        module: a model or layer built from this library's layers (see the module docstring).
        input_shape: the per-step input shape without batch, e.g. ``(C, H, W)`` or ``(D,)``; a SpikingTransformer
            knows its own.
        subgraphs: for a SpikingTransformer, export the NIR-expressible parts (stem, each block's MLP, heads) as
            sub-graphs of one graph instead of failing on its attention.
        dt: the simulation time step one model step stands for (snnTorch's importer uses 1e-4).
    """
    if not (math.isfinite(dt) and dt > 0):
        raise ConfigError(f"dt must be a positive number, got {dt!r}")
    if isinstance(module, SpikingTransformer):
        return _transformer_graph(module, subgraphs, dt)
    if input_shape is None:
        raise ConfigError(f"to_nir needs the per-step input_shape of a {type(module).__name__}")
    return _graph(module, tuple(input_shape), dt)


def _transformer_graph(model: SpikingTransformer, subgraphs: bool, dt: float) -> Any:
    if not subgraphs:
        raise NIRUnsupported(
            f"{getattr(model, 'model_name', type(model).__name__)} cannot be exported to NIR as a whole: its spiking "
            f"self-attention ({type(model.blocks[0].attn).__name__ if len(model.blocks) else 'none'} in every block) "
            f"needs {'; '.join(ATTENTION_OPS)}, and the classifier reads the mean over tokens and time steps; "
            "export the supported sub-graphs (stem, MLPs, heads) with subgraphs=True (--subgraphs)")
    d = model.embed_dim
    parts: dict[str, Any] = {"patch_embed": _graph(model.patch_embed, (model.in_channels, model.img_size,
                                                                       model.img_size), dt)}
    for j, blk in enumerate(model.blocks):
        parts[f"blocks.{j}.mlp"] = _graph(blk.mlp, (d,), dt)
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            parts[name] = _graph(head, (d,), dt)
    note = ("Independent sub-graphs; between them run operations NIR cannot express: the spiking self-attention "
            f"of every block ({'; '.join(ATTENTION_OPS)}), the block couplings (reversible: X0' = Attn(X1) + "
            "(X0 + X1)/2, X1' = MLP(X0') + (X1 + X0')/2) and the mean over tokens and time before the heads. The stem "
            "outputs [D, H, W]; tokens are its flattened transpose; the MLPs run on each token.")
    return nir.NIRGraph(nodes=parts, edges=[], metadata={"source": "bestformer", "dt": dt, "note": note},
                        type_check=False)


def export_nir(model: nn.Module, path: str | Path, subgraphs: bool = False, input_shape: Sequence[int] | None = None,
               dt: float = 1e-4) -> Path:
    """Write ``to_nir(model, ...)`` to ``path`` (NIR's HDF5 file, written atomically); returns the path."""
    graph = to_nir(model, input_shape, subgraphs, dt)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            nir.write(tmp, graph)
    except OSError as err:
        raise FileFormatError(f"cannot write NIR file {path}: {err.strerror or err}") from None
    return path
