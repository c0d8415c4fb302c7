"""Deployment of 1-bit models: BatchNorm / lambda folding, the packed ``.bst`` file, its bit-packed runtime
(numpy + numba, no torch) and NIR export.

- :func:`export_packed` (``bestformer export CKPT --format packed``) folds a model and writes a ``.bst`` file;
- :class:`PackedModel` (``bestformer predict``) loads and runs it with popcounts on 64-bit words;
- :func:`export_nir` (``bestformer export CKPT --format nir``) writes the parts NIR can express.

Names load on first use (PEP 562): ``from bestformer.deploy import PackedModel`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_packed": "fold",
    "fold_model": "fold",
    "PackedModel": "runtime",
    "PackedModelData": "packfile",
    "read_packed": "packfile",
    "write_packed": "packfile",
    "export_nir": "nir_export",
    "to_nir": "nir_export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
