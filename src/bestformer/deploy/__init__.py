"""Deployment of 1-bit models: BatchNorm / lambda folding, the packed ``.bst`` file, its bit-packed runtime
(numpy + numba, no torch) and NIR export.

- :func:`export_packed` (``bestformer export CKPT --format packed``) folds a model and writes a ``.bst`` file;
- :class:`PackedModel` (``bestformer predict``) loads and runs it with popcounts on 64-bit words;
- :func:`export_nir` (``bestformer export CKPT --format nir``) writes the parts NIR can express;
- :func:`export_onnx` (``bestformer export CKPT --format onnx``) writes an ONNX graph of the folded model;
- :func:`export_c` (``bestformer export CKPT --format c``) writes a C99 inference library (no malloc, libc only)
  whose logits equal the packed runtime's bit for bit; :func:`compile_library` builds and loads it (ctypes).

Names load on first use (PEP 562): ``from bestformer.deploy import PackedModel`` does not import torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_LAZY = {
    "export_packed": "fold",
    "fold_model": "fold",
    "PackedModel": "runtime",
    "PackedModelData": "packfile",
    "read_packed": "packfile",
    "write_packed": "packfile",
    "export_nir": "nir_export",
    "export_onnx": "onnx_export",
    "export_c": "c_export",
    "compile_library": "c_build",
    "to_nir": "nir_export",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
