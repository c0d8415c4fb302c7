"""Memory-lean backward: binary activations saved as bits, activation checkpointing that leaves the model's
buffers as one forward would.

Autograd keeps, for every matrix product, convolution and pooling whose input is a spike tensor, a float32 copy
of that input: in a BESTformer those are about half of the saved activations, although each element is 0 or 1.
:func:`spike_packing` installs saved-tensor hooks (:func:`torch.autograd.graph.saved_tensors_hooks`) that store
every saved floating-point tensor whose values are all 0 or 1 as 1 bit per element and give back the identical
tensor (same values, same strides) in backward, so gradients are bit-identical with and without it. No layer needs
to know: a spike tensor consumed by several layers (Q, K and V read the same spikes) is packed once. On CPU every
saved tensor is checked (one pass, after a 256-element prefix rejects real-valued ones); on a GPU only the spikes
written by the fused LIF kernels are packed, without looking at them (a check would synchronise the device).

:func:`checkpoint_module` recomputes a block in backward instead of keeping its activations (timm's
``set_grad_checkpointing``); during the recomputation the block's buffers (BatchNorm running statistics) are put
back afterwards, so a checkpointed step updates them exactly once, as a plain step does.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..neurons.kernels import cpu as cpu_kernels
from ..neurons.kernels.fused import is_marked_binary

#: tensors smaller than this stay as they are (the check costs more than it saves)
MIN_PACK_NUMEL = 4096
#: leading elements checked first, to reject real-valued tensors after a few reads
_PREFIX = 256


class PackedBits(NamedTuple):
    """A binary floating-point storage as bits, and how the saved view sat in it."""

    bits: Tensor
    numel: int
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def pack_bits(flat: Tensor, verify: bool = True) -> Tensor | None:
    """``[n]`` tensor -> ``[ceil(n / 8)]`` uint8, element ``i`` in bit ``i % 8`` of byte ``i // 8``; None when
    ``verify`` and an element is neither 0 nor 1. CPU float32/64: one numba pass (which always verifies);
    elsewhere tensor operations (``verify=False`` avoids the device synchronisation of the check)."""
    if verify:
        head = flat[:_PREFIX]
        if not bool(((head == 0) | (head == 1)).all()):  # rejects real-valued tensors after a few reads
            return None
    if cpu_kernels.supports(flat):
        return cpu_kernels.pack_binary(flat)
    if verify and not bool(((flat == 0) | (flat == 1)).all()):
        return None
    ones = flat == 1
    pad = -ones.numel() % 8
    if pad:
        ones = torch.cat([ones, ones.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (ones.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[numel]`` tensor of 0/1 in ``dtype``."""
    if bits.device.type == "cpu" and dtype in (torch.float32, torch.float64):
        return cpu_kernels.unpack_binary(bits, numel, dtype)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].to(dtype)


class SpikePacker:
    """The pack / unpack hooks of :func:`spike_packing`; remembers, per live storage, whether it was binary and
    its bits, and counts what it replaced.

    Attributes:
        packed_tensors: storages stored as bits.
        float_bytes: their size as floats; bit_bytes: their size as bits.
    """

    def __init__(self) -> None:
        # storage address -> (weak reference to the storage, its version, bits or None when not binary)
        self._seen: dict[int, tuple[weakref.ref, int, Tensor | None]] = {}
        self.packed_tensors = self.float_bytes = self.bit_bytes = 0

    def _bits_of(self, t: Tensor) -> Tensor | None:
        storage = t.untyped_storage()
        hit = self._seen.get(storage.data_ptr())
        if hit is not None and hit[0]() is storage and hit[1] == t._version:
            return hit[2]
        flat = t.new_empty(0).set_(storage)  # every element of the storage, not only this view's
        # CPU: check the values (cheap, and finds every binary tensor); other devices: trust only the fused
        # LIF's own outputs, since a value check would synchronise the device for every saved tensor
        verify = t.device.type == "cpu"
        bits = pack_bits(flat, verify) if verify or is_marked_binary(t) else None
        if bits is not None:
            self.packed_tensors += 1
            self.float_bytes += storage.nbytes()
            self.bit_bytes += bits.numel()
        self._seen[storage.data_ptr()] = (weakref.ref(storage), t._version, bits)
        return bits

    def pack(self, t: Tensor) -> Tensor | PackedBits:
        if not t.is_floating_point() or t.numel() < MIN_PACK_NUMEL or t.layout != torch.strided or t.is_leaf:
            return t
        bits = self._bits_of(t)
        if bits is None:
            return t
        numel = t.untyped_storage().nbytes() // t.element_size()
        return PackedBits(bits, numel, t.dtype, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed: Tensor | PackedBits) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        flat = unpack_bits(packed.bits, packed.numel, packed.dtype)
        return flat.as_strided(packed.size, packed.stride, packed.offset)


@contextlib.contextmanager
def spike_packing(enabled: bool = True) -> Iterator[SpikePacker | None]:
    """Within the block, binary float tensors saved for backward are kept as bits (see the module docstring);
    yields the :class:`SpikePacker` (its counters say what was packed), or None when not ``enabled``.

    Leaf tensors (parameters, the input batch) stay as they are, since they are kept alive anyway; so are tensors
    with any value other than 0 and 1 in their storage.
    """
    if not enabled:
        yield None
        return
    packer = SpikePacker()
    with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
        yield packer


#: how deep this thread is in recomputing checkpointed blocks (backward's re-run of their forward)
_RECOMPUTING = threading.local()


def recomputing() -> bool:
    """Whether this thread is re-running a checkpointed block in backward: hooks that record what a forward pass
    computed (firing rates, fine-grained distillation's q/k/v) skip the second run."""
    return getattr(_RECOMPUTING, "depth", 0) > 0


@contextlib.contextmanager
def _recomputation(module: nn.Module) -> Iterator[None]:
    """Run the block again, then put every buffer back (the recomputation must not count a second BN update)."""
    saved = [(buf, buf.detach().clone()) for buf in module.buffers()]
    _RECOMPUTING.depth = getattr(_RECOMPUTING, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTING.depth -= 1
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def checkpoint_module(module: nn.Module, *args: Any) -> Any:
    """``module(*args)``, keeping only ``args`` for backward and recomputing the rest there (non-reentrant
    :func:`torch.utils.checkpoint.checkpoint`); the recomputation leaves ``module``'s buffers unchanged.

    The recomputed forward is bit-identical to the first one (same inputs, same deterministic kernels, BatchNorm
    in training mode normalises with the same batch statistics), so the gradients are those of a plain step.
    """
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputation(module)))
