"""The safetensors container shared by checkpoints and resume states: tensors plus one JSON header stored in
the file's metadata, a SHA-256 of the tensor data in that header, and one validator of format and version.

safetensors has no checksum of its own: a flipped bit in the data section loads silently. The header therefore
records ``tensor_sha256``, the SHA-256 of the bytes after the safetensors header (the data section, which does
not depend on the metadata), and :func:`read_container` checks it before anything uses the tensors. The hash
can be checked without this library: ``sha256(file[8 + int.from_bytes(file[:8], "little"):])``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import FileFormatError
from ..fileio import atomic_write_bytes
from ..version import __version__

HASH_KEY = "tensor_sha256"


def _data_section(blob: bytes) -> bytes:
    return blob[8 + int.from_bytes(blob[:8], "little"):]


def encode_container(tensors: dict[str, torch.Tensor], meta_key: str, header: dict[str, Any],
                     default: Any = None) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes, and ``header`` completed with the SHA-256 of the tensor data."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = hashlib.sha256(_data_section(st_save(tensors))).hexdigest()
    header = {**header, HASH_KEY: digest}
    return st_save(tensors, metadata={meta_key: json.dumps(header, default=default)}), header


def write_container(path: str | Path, tensors: dict[str, torch.Tensor], meta_key: str, header: dict[str, Any],
                    default: Any = None) -> dict[str, Any]:
    """Write atomically; returns the header as stored (with its hash)."""
    blob, header = encode_container(tensors, meta_key, header, default)
    atomic_write_bytes(path, blob)
    return header


def read_container(path: str | Path, meta_key: str, what: str = "checkpoint", expected_sha256: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors of a safetensors file and the JSON value under ``meta_key`` in its metadata (``None`` when absent).

    A missing, unreadable, truncated or corrupt file, or tensor data whose SHA-256 differs from the one its header
    records (or, for a file without an embedded header, ``expected_sha256``: its sidecar's), gives one
    :class:`FileFormatError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileFormatError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        state = st_load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        embedded = json.loads(meta.get(meta_key, "null"))
    except (SafetensorError, ValueError, TypeError, UnicodeDecodeError, AttributeError, RecursionError) as err:
        raise FileFormatError(f"{what} {path} is truncated or corrupt ({err})") from None
    digest = embedded.get(HASH_KEY) if isinstance(embedded, dict) else expected_sha256
    if digest is not None and hashlib.sha256(_data_section(data)).hexdigest() != digest:
        raise FileFormatError(f"{what} {path} is corrupt: the SHA-256 of its tensor data differs from the one "
                                  "recorded when it was written (damaged on disk or in transfer)")
    return state, embedded


def check_header(header: Any, path: Path, fmt: str, version: int, what: str, hashed_from: int) -> dict[str, Any]:
    """``header`` as a mapping of format ``fmt`` at a ``format_version`` this library reads (<= ``version``);
    versions from ``hashed_from`` on must carry the tensor hash (older files were written before it existed)."""
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise FileFormatError(f"{path} is not a bestformer {what} (no '{fmt}' header)")
    found = header.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise FileFormatError(f"{path}: invalid {what} format_version {found!r}")
    if found > version:
        raise FileFormatError(f"{path} was written by a newer bestformer ({what} format {found}, library "
                              f"{header.get('library_version')}); this version {__version__} reads format <= "
                              f"{version}: upgrade bestformer")
    if found >= hashed_from and not isinstance(header.get(HASH_KEY), str):
        raise FileFormatError(f"{path}: the {what} header lacks the SHA-256 of its tensor data ({HASH_KEY})")
    return header
