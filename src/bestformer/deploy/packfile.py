"""The packed model file (``.bst``): one self-describing file holding a folded 1-bit model.

Byte layout (all integers little-endian)::

    offset  size  content
    0       8     magic  b"\\x89BSTF\\r\\n\\x1a"   (PNG-style: catches text-mode and 7-bit transfers)
    8       4     uint32 format version (this library writes and reads 1)
    12      4     uint32 H, the length of the header
    16      H     header: zlib-compressed UTF-8 JSON (description below)
    16+H    P     payload: the tensors back to back, each at the offset the header gives (relative to 16+H)
    end-32  32    SHA-256 of every byte before it

The header is a JSON object with ``format``, ``format_version``, ``library_version``, ``model_name`` and
``model_args`` (provenance), ``arch`` (what the runtime builds: widths, depth, heads, attention form, coupling,
heads, pooling), ``bn`` (how the folded per-channel affine is evaluated, ``"fma"`` or ``"mul_add"``: the same
rounding as PyTorch's BatchNorm kernel on the exporting machine), ``neurons`` (LIF parameters: ``"default"`` and
the layers that differ from it) and ``tensors``, a list of ``[name, dtype, shape, offset]``. Dtypes:

- ``"bits"``: 1-bit weights (+1 -> bit 1, -1 -> bit 0), packed 8 per byte along the last (input-channel) axis,
  least significant bit first; each row of ``K`` inputs takes ``ceil(K / 8)`` bytes.
- ``"f32"`` / ``"f16"``: IEEE floats (full-precision tensors, as the exporter's ``dtype`` chose).

The header is compressed because at the paper's scale it is a visible share of the file (the whole
``bestformer_4_384`` file is 1.2 MB). This module is numpy-only: the runtime reads files without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FileFormatError
from ..fileio import atomic_write_bytes

MAGIC = b"\x89BSTF\r\n\x1a"
FORMAT_NAME = "bestformer-packed"
FORMAT_VERSION = 1
DIGEST_SIZE = 32
_PREFIX = struct.Struct("<8sII")
#: a decompressed header larger than this is rejected (zlib bombs); real headers are ~10 KB
MAX_HEADER_BYTES = 1 << 24

FLOAT_DTYPES = {"float32": "f32", "float16": "f16"}
_NUMPY = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


@dataclass
class PackedModelData:
    """The content of a packed file: the header fields and the named arrays.

    ``tensors`` holds ``int8`` arrays of +-1 for 1-bit weights and float arrays for the rest (float32 in memory;
    the file stores them as ``float_dtype``). The runtime consumes this object; :func:`write_packed` and
    :func:`read_packed` convert it to and from bytes.
    """

    arch: dict[str, Any]
    neurons: dict[str, dict[str, Any]]
    tensors: dict[str, np.ndarray]
    bn: str = "fma"
    float_dtype: str = "f32"
    info: dict[str, Any] = field(default_factory=dict)


def stem_widths(arch: dict[str, Any]) -> list[int]:
    """The stem's five channel counts: as the file records them, else the reference's ``D/8, D/4, D/2, D, D``
    (files written before the field). The same formula as :class:`~bestformer.layers.stem.PatchSplitting`'s,
    spelt again because the runtime imports without torch (``tests/test_deploy.py`` holds the two equal)."""
    d = arch["embed_dim"]
    return list(arch.get("stem_widths") or [d // 8, d // 4, d // 2, d, d])


def _packed_row_bytes(k: int) -> int:
    return (k + 7) // 8


def _nbytes(dtype: str, shape: list[int]) -> int:
    if dtype == "bits":
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return rows * _packed_row_bytes(shape[-1]) if shape else 0
    return math.prod(shape) * _NUMPY[dtype].itemsize


def pack_bits(signs: np.ndarray) -> bytes:
    """+-1 values -> bytes, 8 per byte along the last axis, LSB first, rows padded to whole bytes."""
    return np.packbits(signs > 0, axis=-1, bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, shape: list[int]) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``int8`` +-1 array of ``shape``."""
    k = shape[-1]
    if math.prod(shape) == 0:
        return np.zeros(shape, np.int8)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, _packed_row_bytes(k))
    bits = np.unpackbits(rows, axis=-1, count=k, bitorder="little")
    return (bits.astype(np.int8) * 2 - 1).reshape(shape)


def _encode_tensor(name: str, arr: np.ndarray, float_dtype: str) -> tuple[str, bytes]:
    if arr.dtype == np.int8:
        if arr.ndim == 0 or not np.all(np.abs(arr) == 1):
            raise ConfigError(f"tensor {name!r}: 1-bit weights must be an int8 array of +-1")
        return "bits", pack_bits(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"tensor {name!r} has dtype {arr.dtype}; expected int8 (+-1) or a float array")
    out = np.ascontiguousarray(arr, dtype=_NUMPY[float_dtype])
    if not np.isfinite(out).all():
        raise ConfigError(f"tensor {name!r} has values that are not finite in {float_dtype} (max |x| = "
                          f"{np.abs(arr).max():.3g}); export with dtype float32")
    return float_dtype, out.tobytes()


def encode_packed(data: PackedModelData, library_version: str = "", model_name: str = "",
                  model_args: dict[str, Any] | None = None) -> bytes:
    """The bytes of a packed file (see the module docstring for the layout)."""
    if data.float_dtype not in _NUMPY:
        raise ConfigError(f"float dtype must be one of {sorted(_NUMPY)}, got {data.float_dtype!r}")
    table: list[list[Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, arr in data.tensors.items():
        dtype, raw = _encode_tensor(name, np.asarray(arr), data.float_dtype)
        table.append([name, dtype, [int(s) for s in np.shape(arr)], offset])
        chunks.append(raw)
        offset += len(raw)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "model_name": model_name,
        "model_args": model_args or {},
        "arch": data.arch,
        "bn": data.bn,
        "neurons": _compact_neurons(data.neurons),
        "info": data.info,
        "tensors": table,
    }
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, default=_json_default)
    zheader = zlib.compress(text.encode("utf-8"), 9)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(zheader)) + zheader + b"".join(chunks)
    return body + hashlib.sha256(body).digest()


def _compact_neurons(neurons: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The most common parameter set as ``"default"`` plus the layers that differ from it."""
    if not neurons:
        return {}
    texts = [json.dumps(p, sort_keys=True) for p in neurons.values()]
    common = max(dict.fromkeys(texts), key=texts.count)  # a tie goes to the first layer's: the same bytes every run
    out = {"default": json.loads(common)}
    out.update({name: p for (name, p), t in zip(neurons.items(), texts) if t != common})
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def write_packed(data: PackedModelData, path: str | Path, **provenance: Any) -> Path:
    """Write ``data`` atomically to ``path``; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, encode_packed(data, **provenance))
    return path


# ------------------------------------------------------------------------------------------------ reading
def _fail(src: str, what: str) -> FileFormatError:
    return FileFormatError(f"packed model {src}: {what}")


def decode_header(buf: bytes, src: str = "<bytes>") -> tuple[dict[str, Any], int]:
    """Check magic, version, checksum; return the header and the payload's start offset."""
    if len(buf) < _PREFIX.size + DIGEST_SIZE:
        raise _fail(src, f"is truncated ({len(buf)} bytes; a packed model has at least "
                         f"{_PREFIX.size + DIGEST_SIZE})")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise _fail(src, "is not a bestformer packed model (bad magic bytes; expected a file written by "
                         "`bestformer export --format packed`)")
    if version > FORMAT_VERSION:
        raise _fail(src, f"was written by a newer bestformer (packed format {version}); this version reads "
                         f"format <= {FORMAT_VERSION}: upgrade bestformer")
    if version < 1:
        raise _fail(src, f"has an invalid format version {version}")
    if hashlib.sha256(buf[:-DIGEST_SIZE]).digest() != buf[-DIGEST_SIZE:]:
        raise _fail(src, "is truncated or corrupt (SHA-256 checksum mismatch)")
    start = _PREFIX.size + hlen
    if start > len(buf) - DIGEST_SIZE:
        raise _fail(src, f"header length {hlen} runs past the end of the file")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(buf[_PREFIX.size:start], MAX_HEADER_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise _fail(src, "header is not a complete zlib stream (or larger than 16 MB)")
        header = json.loads(text.decode("utf-8"))
    except (zlib.error, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 / JSON, or a too-long number
        raise _fail(src, f"header is corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise _fail(src, f"header does not describe a '{FORMAT_NAME}' file")
    if header.get("format_version") != version:
        raise _fail(src, f"header format_version {header.get('format_version')!r} differs from the file's {version}")
    return header, start


def _check_table(header: dict[str, Any], payload_size: int, src: str) -> list[tuple[str, str, list[int], int]]:
    table = header.get("tensors")
    if not isinstance(table, list):
        raise _fail(src, "header lacks the tensor table")
    out = []
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and entry[1] in ("bits", *_NUMPY) and isinstance(entry[2], list)
                and len(entry[2]) <= 8
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 1 << 31 for s in entry[2])
                and math.prod(entry[2]) < 1 << 40  # no model tensor is empty or beyond numpy's reach
                and isinstance(entry[3], int) and not isinstance(entry[3], bool) and entry[3] >= 0):
            raise _fail(src, f"malformed tensor entry {repr(entry)[:80]}")  # repr: one line, whatever it holds
        name, dtype, shape, offset = entry
        if dtype == "bits" and not shape:
            raise _fail(src, f"tensor {name!r}: 1-bit tensors need at least one axis")
        end = offset + _nbytes(dtype, shape)
        if end > payload_size:
            raise _fail(src, f"tensor {name!r} ({dtype} {shape}) runs past the end of the payload")
        out.append((name, dtype, shape, offset))
    if len({e[0] for e in out}) != len(out):
        raise _fail(src, "tensor table lists a name twice")
    return out


def decode_packed(buf: bytes, src: str = "<bytes>") -> tuple[PackedModelData, dict[str, Any]]:
    """Parse and validate the bytes of a packed file (format level); returns the data and the full header.

    Architecture-level checks (every tensor the model needs, with the right shape) belong to the runtime.
    """
    header, start = decode_header(buf, src)
    payload = memoryview(buf)[start:len(buf) - DIGEST_SIZE]
    float_dtypes = set()
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset in _check_table(header, len(payload), src):
        raw = payload[offset:offset + _nbytes(dtype, shape)]
        if dtype == "bits":
            tensors[name] = unpack_bits(raw, shape)
        else:
            float_dtypes.add(dtype)
            arr = np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape).astype(np.float32)
            if not np.isfinite(arr).all():
                raise _fail(src, f"tensor {name!r} has non-finite values (NaN/inf)")
            tensors[name] = arr
    for key, kind in (("arch", dict), ("neurons", dict), ("bn", str)):
        if not isinstance(header.get(key), kind):
            raise _fail(src, f"header field {key!r} is missing or not a {kind.__name__}")
    info = header.get("info") if isinstance(header.get("info"), dict) else {}
    data = PackedModelData(arch=header["arch"], neurons=header["neurons"], tensors=tensors, bn=header["bn"],
                           float_dtype=float_dtypes.pop() if len(float_dtypes) == 1 else "f32", info=info)
    return data, header


def read_packed(path: str | Path) -> tuple[PackedModelData, dict[str, Any]]:
    """Read and validate a packed file; one :class:`FileFormatError` line for any problem."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"packed model not found: {path}") from None
    except IsADirectoryError:
        raise FileFormatError(f"packed model path {path} is a folder, not a file") from None
    except OSError as err:
        raise FileFormatError(f"cannot read packed model {path}: {err.strerror or err}") from None
    return decode_packed(buf, str(path))
