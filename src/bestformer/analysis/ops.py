"""Count what a model computes by running it: MACs, SOPs and NS-ACE per layer, firing rates per spiking layer.

The model runs under a :class:`torch.overrides.TorchFunctionMode` that sees every ``F.linear``,
``F.conv1d/2d/3d``, ``matmul`` / ``@`` / ``mm`` / ``bmm`` and two-operand ``einsum``, and module hooks that keep
the stack of running modules, so each product is attributed to the innermost module that issues it. Nothing
here knows a model family: a layer's weight bits come from the layer (:func:`bestformer.quant.weight_bits_of`)
and every activation operand is classified from its values (:func:`~bestformer.analysis.values.classify_values`).

Conventions (the field's, Spikformer / Spike-driven Transformer / BESTformer Table 3; where they are silent, ours):

- ``MACs``: the dense multiply-accumulates of a product, over every time step and sample, reported per sample
  (``T * MACs_per_step`` for a layer run at every step; the direct-encoding first convolution runs once per image
  because the stem repeats its output over ``T``, so it is charged once). Linear ``B' * C_in * C_out`` (``B'``
  all leading dims), convolution ``numel(out) * C_in / groups * prod(kernel)``, ``A @ B`` ``numel(out) * k``.
  BatchNorm, neuron updates, pooling, residual additions and constant scalings are not counted (they fold or are
  not synaptic operations).
- A product with an *event* operand (binary, ternary or multi-level spikes, small integer counts) is a synaptic
  operation: ``SOPs`` = the products whose event operands are all non-zero, counted exactly from the masks
  (``fr * T * MACs`` with ``fr = SOPs / MACs`` the measured rate; for a linear layer ``fr`` is exactly the
  input's fraction of non-zeros, for a zero-padded convolution border taps are not counted), where a level ``k``
  of a declared multi-level spike counts as ``k`` binary spikes (QSD's 4-1-4 inference form:
  :mod:`~bestformer.analysis.spikes`). Weights are taken as dense.
  A product without event operands (the first convolution on images, the heads, every layer of an ANN) counts
  its MACs as ``real_macs`` (charged at ``E_MAC``).
- ``NS-ACE`` (Shen et al., CVPR 2024, as used in BESTformer Table 3): ``sum b_w * b_a * SOPs`` over synaptic
  operations, each non-zero entry counted once. ``b_a`` is the event operand's bits (1 for binary spikes,
  ``ceil(log2(D + 1))`` for a neuron that declares ``D`` levels, ``ceil(log2 L)`` for another operand with ``L``
  levels; the lower when both operands are events: the lower-precision operand drives, the other is accumulated).
  ``b_w``
  is the layer's weight bits, full precision charged at ``fp_bits``; an activation x activation product has no
  weight and is charged at the weight bits of the block that computes it (the widest weight among the innermost
  running module's layers), which is what Table 3's relations imply (the 2-bit Q-Spikformer's NS-ACE is exactly
  2 x its SOPs, attention included).
- Firing rate of a spiking layer: its output's fraction of non-zeros over every step, sample and batch. A spiking
  layer is the innermost module whose output is an event operand and that follows the neuron contract
  (:func:`bestformer.neurons.is_spiking_neuron`: counted even in a batch where its input is silent or binary),
  or whose input is not an event or has more levels (any other module: LIF and IE-LIF on real membranes, the
  soft-reset LIF of Eq. 9 on the integer attention map; not pooling). Layers with weights and normalisation
  layers are never taken for neurons, and the input must be an activation, not a Parameter (weight quantizers
  also output +-1).
- The model's input is a value operand (the encoding layer is charged at ``E_MAC``), and so is the output of a
  module that declares ``emits_values`` (the quantized activation of a CSD ANN, whose ``theta / L`` grid would
  otherwise read as multi-level spikes). What is computed from values alone stays a value: copies, arithmetic,
  means, pooling, normalisation (:data:`~bestformer.analysis.spikes.VALUE_FUNCS`; a time-first view that a layer
  flattens into a copy, a CSD ANN's mean of event frames) and products (all zero in an untrained model, which
  would otherwise read as silent spikes). A comparison or rounding (a neuron's spike) is never followed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..neurons import is_spiking_neuron
from ..quant import weight_bits_of
from .precision import FP_BITS, FULL_PRECISION, check_fp_bits
from .spikes import (
    VALUE_FUNCS,
    TensorTags,
    conv_products,
    declared_levels,
    event_counts,
    exact_sum,
    multilevel_kind,
    product_counts,
)
from .stats import NeuronStats, OpStats
from .values import ValueKind, classify_values

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)

#: intercepted torch functions -> the product they compute
PRODUCT_FUNCS: dict[Callable[..., Any], str] = {
    F.linear: "linear",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    torch.matmul: "matmul",
    torch.Tensor.matmul: "matmul",
    torch.Tensor.__matmul__: "matmul",
    torch.mm: "matmul",
    torch.Tensor.mm: "matmul",
    torch.bmm: "matmul",
    torch.Tensor.bmm: "matmul",
    torch.einsum: "einsum",
}
_LAYER_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LAYER_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass
class _Frame:
    name: str
    module: nn.Module
    products: dict[str, int] = field(default_factory=dict)
    spiking_child: bool = False


def batch_size_of(x: Tensor) -> int:
    """Samples in a model input: axis 1 of time-first event frames ``[T, B, C, H, W]``, else axis 0."""
    return int(x.shape[1] if x.dim() == 5 else x.shape[0])


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, Tensor):
                return item
    return None


def _layer_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``F.linear`` / ``F.convNd`` by name (``F.linear`` uses the first three)."""
    out = dict(_LAYER_DEFAULTS)
    out.update(zip(_LAYER_ARGS, args))
    out.update(kwargs)
    return out


class OpCounter(TorchFunctionMode):
    """Count products and spikes while a model runs. Use as a context manager around :meth:`run`::

        with OpCounter(model) as counter:
            for x in batches:
                counter.run(x)
        layers, neurons = counter.op_stats(), counter.neuron_stats()

    Args:
        model: any ``nn.Module``; hooks are added to all its modules and removed on exit.
        fp_bits: bits NS-ACE charges a full-precision (32-bit) weight (16, as BESTformer's Table 3:
            :mod:`~bestformer.analysis.precision`).
    """

    def __init__(self, model: nn.Module, fp_bits: int = FP_BITS) -> None:
        super().__init__()
        self.model = model
        self.fp_bits = check_fp_bits(fp_bits)
        self.samples = 0
        self._ops: dict[str, OpStats] = {}
        self._op_kinds: dict[str, set[str]] = {}
        self._neurons: dict[str, NeuronStats] = {}
        self._neuron_kinds: dict[str, set[str]] = {}
        self._stack: list[_Frame] = []
        self._handles: list[Any] = []
        self._names = {id(m): n for n, m in model.named_modules()}
        self._contract = {id(m) for m in model.modules() if is_spiking_neuron(m)}  # found once, not per call
        self._block_bits: dict[int, int | None] = {}
        self._kinds: dict[int, tuple[weakref.ref[Tensor], ValueKind]] = {}
        self._input_storages: set[int] = set()
        self._declared = TensorTags()
        # values, never events: the model's input, the outputs of a module that ``emits_values`` (a quantized ANN
        # activation) and of a product of values, followed through the value functions (copies, arithmetic, means,
        # pooling, normalisation)
        self._values = TensorTags(VALUE_FUNCS)

    # ------------------------------------------------------------------------------------------- life cycle
    def __enter__(self) -> OpCounter:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._post_hook))
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._forget_batch()

    def _forget_batch(self) -> None:
        """Drop what was learned about one batch's tensors (their kinds and tags are per batch)."""
        self._kinds.clear()
        self._declared.clear()
        self._values.clear()

    def run(self, x: Tensor, batch_size: int | None = None) -> Any:
        """Run the model on one batch (no gradient) and count it. ``batch_size`` defaults to the batch axis of a
        time-first ``[T, B, ...]`` (5-D) or image ``[B, ...]`` input."""
        self._input_storages = {x.untyped_storage().data_ptr()}
        self._forget_batch()
        self._values.declare(x, "input")
        with torch.no_grad():
            out = self.model(x)
        self.samples += batch_size if batch_size is not None else batch_size_of(x)
        self._forget_batch()
        return out

    # -------------------------------------------------------------------------------------------- results
    def op_stats(self) -> list[OpStats]:
        """Per-sample totals of every product site, in execution order."""
        n = max(self.samples, 1)
        out = []
        for key, s in self._ops.items():
            out.append(OpStats(s.name, s.op, " | ".join(sorted(self._op_kinds[key])), s.weight_bits,
                               s.charge_bits, s.shape, s.macs / n, s.real_macs / n, s.sops / n, s.ns_ace / n,
                               s.calls, s.events / n))
        return out

    def neuron_stats(self) -> list[NeuronStats]:
        """Firing of every spiking layer, in execution order."""
        return [NeuronStats(s.name, " | ".join(sorted(self._neuron_kinds[s.name])), s.spikes, s.elements)
                for s in self._neurons.values()]

    # ----------------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._stack.append(_Frame(self._names.get(id(module), type(module).__name__), module))

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        frame = self._stack.pop()
        spiking = frame.spiking_child
        if getattr(module, "emits_values", False):
            self._values.declare(output, "value")
        # synapses (layers with weights) and normalisation layers are never neurons: skip their values
        elif not spiking and weight_bits_of(module) is None and not isinstance(module, _NORMS):
            out, inp = _first_tensor(output), _first_tensor(args)
            # a weight quantizer maps a Parameter to +-1: neurons act on activations only
            if out is not None and inp is not None and not isinstance(inp, nn.Parameter):
                kind = self._kind(out)
                if kind.event and (id(module) in self._contract or not (kind_in := self._kind(inp)).event
                                   or kind.levels < kind_in.levels):
                    if (levels := declared_levels(module)) is not None:
                        self._declared.declare(out, levels)
                        kind = multilevel_kind(levels[0])
                    self._count_spikes(frame.name or "(model)", out, kind)
                    spiking = True
        if spiking and self._stack:
            self._stack[-1].spiking_child = True  # only the innermost spiking module is a spiking layer

    def _count_spikes(self, name: str, out: Tensor, kind: ValueKind) -> None:
        stats = self._neurons.setdefault(name, NeuronStats(name, ""))
        self._neuron_kinds.setdefault(name, set()).add(str(kind))
        stats.spikes += int(torch.count_nonzero(out).item())
        stats.elements += out.numel()

    def _kind(self, x: Tensor) -> ValueKind:
        """Classify ``x`` (from its neuron's declaration, else its values), cached per tensor for the batch."""
        if (levels := self._declared.get(x)) is not None:
            return multilevel_kind(levels[0])
        hit = self._kinds.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        tag = "input" if x.untyped_storage().data_ptr() in self._input_storages else self._values.get(x)
        kind = classify_values(x, model_input=tag is not None)
        if tag == "value" and kind.event:  # binary or ternary values (an untrained model's zeros): still values
            kind = ValueKind("integer", kind.levels, event=False)
        self._kinds[id(x)] = (weakref.ref(x), kind)
        return kind

    # -------------------------------------------------------------------------------------------- products
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = PRODUCT_FUNCS.get(func)
        if op is None:
            self._declared.follow(func, args, out)
            self._values.follow(func, args, out)
        if op is None or not self._stack or not isinstance(out, Tensor):
            return out
        if op == "einsum":
            self._einsum(args, out)
        elif op == "matmul":
            if len(args) >= 2:
                self._product(op, args[0], args[1], out, torch.matmul)
        else:
            self._weight_layer(op, func, _layer_args(args, kwargs), out)
        return out

    def _site(self, frame: _Frame, op: str, own_layer: bool) -> str:
        """The key of a product: the layer's name, or ``name/matmul0``, ``name/matmul1``... per module call."""
        idx = frame.products.get(op, 0)
        frame.products[op] = idx + 1
        name = frame.name or "(model)"
        return name if own_layer and idx == 0 else f"{name}/{op}{idx}"

    def _charge(self, bits: int) -> int:
        return self.fp_bits if bits >= FULL_PRECISION else bits

    def _record(self, key: str, op: str, operands: str, weight_bits: int | None, charge: int, shape: str,
                macs: int, counts: tuple[int, int] | None, b_a: int) -> None:
        """Add one call: ``counts`` = ``(event operations, SOPs)``; ``None`` for a product without event operands
        (all its MACs are real-valued)."""
        s = self._ops.setdefault(key, OpStats(key, op, "", weight_bits, charge, shape))
        self._op_kinds.setdefault(key, set()).add(operands)
        s.macs += macs
        s.calls += 1
        if counts is None:
            s.real_macs += macs
        else:
            s.events += counts[0]
            s.sops += counts[1]
            s.ns_ace += charge * b_a * counts[0]

    def _weight_layer(self, op: str, func: Callable[..., Tensor], a: dict[str, Any], out: Tensor) -> None:
        frame = self._stack[-1]
        x, w = a["input"], a["weight"]
        layer_bits = weight_bits_of(frame.module)
        weight_bits = layer_bits if layer_bits is not None else FULL_PRECISION  # a functional call with a float weight
        kx = self._kind(x)
        counts = None
        declared = self._declared.get(x)
        if kx.event:
            mask, spikes = event_counts(x, kx, declared)
        if op == "linear":
            macs = x.numel() * w.shape[0]
            if kx.event:
                counts = (exact_sum(mask) * w.shape[0], exact_sum(spikes) * w.shape[0])
            shape = f"{tuple(x.shape[-1:])} -> {tuple(out.shape[-1:])}"
        else:
            macs = out.numel() * w.shape[1] * math.prod(w.shape[2:])
            if kx.event:
                events = conv_products(mask, w, func, a)
                counts = (events, conv_products(spikes, w, func, a) if declared is not None else events)
            shape = f"{tuple(x.shape[-3:])} -> {tuple(out.shape[-3:])}"
        key = self._site(frame, op, layer_bits is not None)
        self._record(key, op, f"{kx} x w{weight_bits}", weight_bits, self._charge(weight_bits), shape, macs, counts,
                     kx.bits)
        if not kx.event:
            self._values.declare(out, "value")  # a product of values is a value, even where it happens to be 0

    def _block_charge(self) -> int:
        """``b_w`` of an activation product: the widest weight of the innermost running module that has any."""
        for frame in reversed(self._stack):
            key = id(frame.module)
            if key not in self._block_bits:
                bits = [b for m in frame.module.modules() if (b := weight_bits_of(m)) is not None]
                self._block_bits[key] = max(bits) if bits else None
            block_bits = self._block_bits[key]
            if block_bits is not None:
                return self._charge(block_bits)
        return self.fp_bits

    def _product(self, op: str, a: Any, b: Any, out: Tensor, combine: Callable[[Tensor, Tensor], Tensor],
                 macs: int | None = None) -> None:
        """An activation x activation product (``matmul``; ``einsum`` passes its own ``combine`` and MACs)."""
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return
        ka, kb = self._kind(a), self._kind(b)
        events = [k for k in (ka, kb) if k.event]
        counts = product_counts(combine, [event_counts(a, ka, self._declared.get(a)),
                                          event_counts(b, kb, self._declared.get(b))], [ka, kb]) if events else None
        b_a = min(k.bits for k in events) if events else 0  # the lowest-precision event operand drives
        key = self._site(self._stack[-1], op, False)
        shape = f"{tuple(a.shape[-2:])} @ {tuple(b.shape[-2:])}"
        self._record(key, op, f"{ka} x {kb}", None, self._block_charge(), shape,
                     out.numel() * a.shape[-1] if macs is None else macs, counts, b_a)
        if not events:
            self._values.declare(out, "value")

    def _einsum(self, args: tuple[Any, ...], out: Tensor) -> None:
        equation, operands = args[0], args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if len(operands) != 2:  # only two-operand contractions are products
            return
        a, b = operands

        def combine(x: Tensor, y: Tensor) -> Tensor:
            return torch.einsum(equation, x, y)

        macs = exact_sum(combine(torch.ones_like(a, dtype=torch.float32), torch.ones_like(b, dtype=torch.float32)))
        self._product("einsum", a, b, out, combine, macs)
