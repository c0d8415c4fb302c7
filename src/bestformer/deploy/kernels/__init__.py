"""Compiled kernels of the packed runtime (numba; no torch): :mod:`.core` (popcount, the float32 BatchNorm
and LIF steps, bit packing), :mod:`.layers` (packing, pooling, binary linear / convolution layers) and
:mod:`.attention` (the binary attention forms).

Bit conventions: a spike or +1 weight is a set bit; element ``c`` of a row lives in word ``c // 64`` at bit
``c % 64``. For ``s`` in {0,1} and ``w`` in {-1,+1} packed as ``w+`` (bit set where ``w = +1``)::

    sum_c s_c w_c = 2 popcount(s AND w+) - popcount(s)

so a binary layer's accumulator ``z`` is an exact integer. Everything after it repeats PyTorch's float32
arithmetic operation by operation, so that every spike equals the PyTorch model's in eval mode:

- BatchNorm, folded into a per-channel affine ``X = alpha z + b``, evaluated with one rounding (``fma``),
  as PyTorch's CPU kernel does; the exporter checks this on every integer ``z`` the layer can produce and
  records ``"mul_add"`` instead where the exporting machine's PyTorch rounds twice.
- the LIF charge ``H = V + (X - (V - V_reset)) / tau`` (decay_input) or ``H = beta V + X`` in float32 in the
  same order as :func:`bestformer.neurons.functional.lif_charge`; fire ``H >= V_th`` (PyTorch fires where
  ``H - V_th >= 0``, the same set since a float difference is zero only when the operands are equal); reset to
  ``V_reset`` (hard) or ``H - V_th`` (soft).

Numba is compiled without fast-math, so LLVM keeps each rounding and never contracts a multiply-add.

Every kernel is serial, releases the GIL and works on a range ``[lo, hi)`` of its outer loop; the runtime splits
that range over a thread pool. (Serial kernels compile several times faster than numba's ``prange`` ones, which
matters on a first run and in CI, and the thread count stays a plain argument.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba

from ...fileio import cache_dir


def _kernel_cache() -> str:
    """Where the kernels' compiled code is cached: numba keys a cached function on its own file only, so a kernel
    that inlines a helper of ``core.py`` would keep running an older ``core.py``. The folder is named after a hash
    of every kernel source and numba's version instead, under ``NUMBA_CACHE_DIR`` when set, else under
    ``$BESTFORMER_CACHE/numba`` (numba falls back to ``__pycache__`` when it is not writable)."""
    digest = hashlib.sha256(numba.__version__.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    if numba.config.CACHE_DIR:  # the user's folder for numba's caches (NUMBA_CACHE_DIR): a subfolder of it
        return str(Path(numba.config.CACHE_DIR) / f"bestformer-{digest.hexdigest()[:16]}")
    return str(cache_dir() / "numba" / digest.hexdigest()[:16])


# numba reads CACHE_DIR when a function is decorated: set for these modules' imports only, the user's kept
_USER_CACHE, numba.config.CACHE_DIR = numba.config.CACHE_DIR, _kernel_cache()
try:
    from .attention import attention_channel, attention_token
    from .core import LANES, and_popcount8, block_weights, fma32, lif_vector, popcount, unpack_lif
    from .layers import (
        OUT_BITS,
        OUT_BYTES,
        OUT_FLOAT,
        ROW_TILE,
        affine,
        affine_lif_pack,
        binary_linear,
        im2col3x3,
        maxpool3s2,
        pack_bytes,
    )
finally:
    numba.config.CACHE_DIR = _USER_CACHE

__all__ = [
    "LANES",
    "OUT_BITS",
    "OUT_BYTES",
    "OUT_FLOAT",
    "ROW_TILE",
    "affine",
    "affine_lif_pack",
    "and_popcount8",
    "attention_channel",
    "attention_token",
    "binary_linear",
    "block_weights",
    "fma32",
    "im2col3x3",
    "lif_vector",
    "maxpool3s2",
    "pack_bytes",
    "popcount",
    "unpack_lif",
]
