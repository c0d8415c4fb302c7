"""Fuzzing the packed-model reader: random bytes, mutated files (with and without a repaired checksum) and
mutated headers must give a working model or one :class:`FileFormatError`, never another exception, a hang or a
crash of the compiled kernels."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bestformer.deploy.packfile import DIGEST_SIZE, MAX_HEADER_BYTES
from bestformer.deploy.runtime import PackedModel
from bestformer.errors import FileFormatError

_LONG_RUN = int(os.environ.get("BESTFORMER_FUZZ_EXAMPLES", "0"))  # `make fuzz`: a longer, randomized run
FUZZ = settings(max_examples=_LONG_RUN or 120, deadline=None, derandomize=not _LONG_RUN, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def valid_file() -> bytes:
    """A tiny packed model (two blocks, distillation head) built once per session."""
    import torch

    import bestformer
    from bestformer.deploy.fold import fold_model
    from bestformer.deploy.packfile import encode_packed

    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, embed_dim=16, num_heads=2, depth=2,
                                    time_steps=2).eval()
    return encode_packed(fold_model(model), model_name="bestformer_tiny")


def split(raw: bytes) -> tuple[dict, bytes]:
    hlen = int.from_bytes(raw[12:16], "little")
    return json.loads(zlib.decompress(raw[16:16 + hlen])), raw[16 + hlen:-DIGEST_SIZE]


def assemble(header_bytes: bytes, payload: bytes, prefix: bytes | None = None) -> bytes:
    """A file around a (possibly broken) compressed header, with a valid checksum."""
    body = (prefix or valid_file()[:12]) + len(header_bytes).to_bytes(4, "little") + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def with_checksum(raw: bytes) -> bytes:
    body = raw[:-DIGEST_SIZE] if len(raw) > DIGEST_SIZE else raw
    return body + hashlib.sha256(body).digest()


def load_or_reject(buf: bytes) -> None:
    """The contract: a model that runs, or FileFormatError (one line)."""
    try:
        model = PackedModel.from_bytes(buf, threads=1)
    except FileFormatError as err:
        assert "\n" not in str(err)
        return
    c, h, w = model.input_shape
    if c * h * w * model.time_steps <= 4096:
        logits = model.predict(np.zeros((1, c, h, w), np.float32))
        assert logits.shape == (1, model.num_classes)


def test_valid_file_loads():
    load_or_reject(valid_file())
    assert PackedModel.from_bytes(valid_file()).num_classes == 10


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(buf):
    load_or_reject(buf)


@FUZZ
@given(st.binary(min_size=16, max_size=64))
def test_random_bytes_after_the_magic(tail):
    load_or_reject(valid_file()[:12] + tail)


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1,
                max_size=8),
       st.booleans())
def test_mutated_bytes(edits, repair):
    raw = bytearray(valid_file())
    for pos, val in edits:
        raw[pos % len(raw)] = val
    load_or_reject(with_checksum(bytes(raw)) if repair else bytes(raw))


@FUZZ
@given(st.integers(min_value=0), st.booleans())
def test_truncated(cut, repair):
    raw = valid_file()[: cut % len(valid_file())]
    load_or_reject(with_checksum(raw) if repair else raw)


@FUZZ
@given(st.integers(min_value=0), st.binary(min_size=1, max_size=32))
def test_inserted_bytes(pos, extra):
    raw = valid_file()
    pos %= len(raw)
    load_or_reject(with_checksum(raw[:pos] + extra + raw[pos:]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(st.data())
def test_mutated_header_fields(data):
    """Any field of the header replaced by any JSON value (the checksum repaired): the validation must catch it or
    the model must still run."""
    header, payload = split(valid_file())
    paths = [p for p in _paths(header) if p]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(json_values | st.integers(min_value=0, max_value=300))
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = json.dumps(header, allow_nan=True)
    load_or_reject(assemble(zlib.compress(text.encode()), payload))


@pytest.mark.parametrize("header_bytes", [
    zlib.compress(b"[" * 100_000 + b"]" * 100_000),  # recursion
    zlib.compress(b" " * (MAX_HEADER_BYTES + 10)),  # a zlib bomb past the header limit
    zlib.compress(b"{}")[:-3],  # incomplete stream
    b"not zlib at all",
    zlib.compress(json.dumps({"format": "bestformer-packed", "format_version": 1, "tensors": [["x", "f32", [2**30] * 8,
                                                                                               0]]}).encode()),
    zlib.compress(json.dumps({"format": "bestformer-packed", "format_version": 1, "tensors": [],
                              "arch": {"depth": 2**40}, "neurons": {}, "bn": "fma"}).encode()),
])
def test_hostile_headers_are_rejected_quickly(header_bytes):
    with pytest.raises(FileFormatError):
        PackedModel.from_bytes(assemble(header_bytes, split(valid_file())[1]))


def test_non_finite_floats_are_rejected():
    header, payload = split(valid_file())
    name, _, shape, offset = next(e for e in header["tensors"] if e[1] == "f32")
    nan = np.float32(np.nan).tobytes()
    bad = payload[:offset] + nan + payload[offset + 4:]
    with pytest.raises(FileFormatError, match="non-finite"):
        PackedModel.from_bytes(assemble(zlib.compress(json.dumps(header).encode()), bad))
    assert math.prod(shape) >= 1 and name


def test_a_tensor_entry_holding_a_newline_is_a_one_line_error():
    """Found by `make fuzz` (20,000 examples): the message quoted the entry with str(), newline included."""
    header, payload = split(valid_file())
    header["tensors"][3] = "\n"
    load_or_reject(assemble(zlib.compress(json.dumps(header).encode()), payload))


def test_an_empty_tensor_beside_huge_dimensions_is_refused():
    """Found by `make fuzz` (20,000 examples): shape [0, 2**21, 2**21, 2**21] reached numpy, which refused it."""
    header, payload = split(valid_file())
    header["tensors"][20][2] = [0, 2097152, 2097152, 2097152]
    with pytest.raises(FileFormatError, match="malformed tensor entry"):
        PackedModel.from_bytes(assemble(zlib.compress(json.dumps(header).encode()), payload))
