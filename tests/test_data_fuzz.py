"""Fuzzing every binary parser of bestformer.data (IDX, N-MNIST .bin, AEDAT 2.0, CIFAR pickles, images, tar):
random bytes and mutations of valid files give either a correct result or the library's own error type, never
another exception, a hang or a crash. Inputs are small so the whole file runs in seconds; set
BESTFORMER_FUZZ_EXAMPLES (e.g. 5000) for a longer, randomized run."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bestformer import BestformerError
from bestformer.data import decode_aedat, decode_nmnist, events_to_frames, parse_cifar_batch, parse_idx, safe_unpickle
from bestformer.data.events import NMNIST_SIZE
from bestformer.data.sources import TarTree
from bestformer.data.static import decode_image

_LONG_RUN = int(os.environ.get("BESTFORMER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG_RUN or 150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not _LONG_RUN, database=None)

# ------------------------------------------------------------------------------------------- valid seeds
_RNG = np.random.default_rng(0)
_IDX = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2]) + bytes(range(12))
_IDX_I16 = bytes([0, 0, 0x0B, 1, 0, 0, 0, 3]) + b"\x00\x01\xff\xfe\x7f\x00"
_NMNIST = b"".join(bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 255, t & 255])
                   for x, y, p, t in [(1, 2, 1, 100), (33, 33, 0, 200), (0, 240, 0, 0), (5, 6, 1, 300)])
_AEDAT = b"#!AER-DAT2.0\r\n# comment\r\n" + b"".join(
    int(a).to_bytes(4, "big") + int(t).to_bytes(4, "big") for a, t in [(0x0203, 10), (0x7FFF, 20), (0, 30)])
_CIFAR = {
    "p2": pickle.dumps({"data": _RNG.integers(0, 256, (2, 3072)).astype(np.uint8), "labels": [3, 9]}, protocol=2),
    "p5": pickle.dumps({"data": _RNG.integers(0, 256, (1, 3072)).astype(np.uint8), "labels": [0]}, protocol=5),
}


def _tar_gz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("Train/0/a.bin", _NMNIST), ("Test/1/b.bin", _NMNIST[:10])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_TAR = _tar_gz()


def _image(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_RNG.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


_PNG, _JPEG = _image("PNG"), _image("JPEG")


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """A valid file with a few random byte edits, insertions, deletions and a possible truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            data = data[:pos]
    return bytes(data)


def _either(fn, data: bytes):
    """Run ``fn(data)``: a result, or ``None`` after the library's own error; anything else fails the test."""
    try:
        return fn(data)
    except BestformerError as err:
        assert str(err) and "\n" not in str(err)  # one clear line
        return None


# ---------------------------------------------------------------------------------------------------- IDX
def _check_idx(data: bytes) -> None:
    arr = _either(lambda d: parse_idx(d, "f.idx"), data)
    if arr is not None:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        assert arr.dtype.isnative and 4 + 4 * arr.ndim + arr.nbytes == len(raw)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_idx_random(data: bytes) -> None:
    _check_idx(data)


@FUZZ
@given(st.one_of(mutated(_IDX), mutated(_IDX_I16), mutated(gzip.compress(_IDX))))
@example(data=bytes.fromhex("000008050000000002000000030000000200010203040506"))  # found by make fuzz: 0 x huge dims
def test_fuzz_idx_mutated(data: bytes) -> None:
    _check_idx(data)


# ------------------------------------------------------------------------------------------------ N-MNIST
def _check_nmnist(data: bytes) -> None:
    ev = _either(lambda d: decode_nmnist(d, "r.bin"), data)
    if ev is not None:
        assert len(ev.x) == len(ev.y) == len(ev.p) == len(ev.t) > 0
        assert ev.x.max() < NMNIST_SIZE and ev.y.max() < NMNIST_SIZE and set(ev.p.tolist()) <= {0, 1}
        frames = events_to_frames(*ev, 3, NMNIST_SIZE, NMNIST_SIZE)
        assert frames.sum() == len(ev.t)


@FUZZ
@given(st.binary(max_size=60))
def test_fuzz_nmnist_random(data: bytes) -> None:
    _check_nmnist(data)


@FUZZ
@given(mutated(_NMNIST))
def test_fuzz_nmnist_mutated(data: bytes) -> None:
    _check_nmnist(data)


# -------------------------------------------------------------------------------------------------- AEDAT
def _check_aedat(data: bytes) -> None:
    ev = _either(lambda d: decode_aedat(d, "r.aedat"), data)
    if ev is not None:
        assert len(ev.x) > 0 and ev.x.min() >= 0 and ev.x.max() < 128 and ev.y.min() >= 0 and ev.y.max() < 128
        assert events_to_frames(*ev, 2, 128, 128, "time").sum() == len(ev.t)


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.binary(max_size=60).map(lambda b: b"#!AER-DAT2.0\r\n" + b)))
def test_fuzz_aedat_random(data: bytes) -> None:
    _check_aedat(data)


@FUZZ
@given(mutated(_AEDAT))
def test_fuzz_aedat_mutated(data: bytes) -> None:
    _check_aedat(data)


# ---------------------------------------------------------------------------------------- CIFAR pickles
def _check_cifar(data: bytes) -> None:
    out = _either(lambda d: parse_cifar_batch(d, "data_batch_1", "labels", 10), data)
    if out is not None:
        images, labels = out
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and len(images) == len(labels)
        assert labels.dtype == np.int64 and (labels >= 0).all() and (labels < 10).all()


@FUZZ
@given(st.binary(max_size=80))
def test_fuzz_cifar_random(data: bytes) -> None:
    _check_cifar(data)
    _either(safe_unpickle, data)


@FUZZ
@given(st.one_of(mutated(_CIFAR["p2"]), mutated(_CIFAR["p5"])))
def test_fuzz_cifar_mutated(data: bytes) -> None:
    _check_cifar(data)


@FUZZ
@given(st.binary(min_size=1, max_size=6))
def test_fuzz_unpickle_opcode_soup(tail: bytes) -> None:
    """Short opcode sequences after a protocol header (memo puts, frames, globals) stay contained."""
    _either(safe_unpickle, b"\x80\x02N" + tail)


# ---------------------------------------------------------------------------------------------------- images
@FUZZ
@given(st.one_of(mutated(_PNG), mutated(_JPEG), st.binary(max_size=40)))
def test_fuzz_image_decode(data: bytes) -> None:
    img = _either(lambda d: decode_image(d, "x.jpg"), data)
    if img is not None:
        assert img.mode == "RGB" and np.asarray(img).dtype == np.uint8


# ------------------------------------------------------------------------------------------------- archives
@settings(max_examples=_LONG_RUN or 60, deadline=None, derandomize=not _LONG_RUN, database=None)
@given(mutated(_TAR))
def test_fuzz_tar_gz_mutated(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("tar")) / "x.tar.gz"
    path.write_bytes(data)
    tree = _either(TarTree, path)
    if tree is not None:
        for name in tree.files():
            _either(lambda d, n=name: decode_nmnist(d, n), tree.read(name))
