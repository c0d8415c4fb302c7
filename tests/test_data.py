"""bestformer.data: splits, event binning, every file parser on hand-built files, every dataset on tiny synthetic
data in a tmp folder (and a few real samples from ../shared/data), and the errors a user can meet."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bestformer import ConfigError, FileFormatError, InputError, create_model
from bestformer.data import (
    build_datasets,
    decode_aedat,
    decode_nmnist,
    events_to_frames,
    interleave_classes,
    list_datasets,
    parse_cifar_batch,
    parse_idx,
    read_idx,
    safe_unpickle,
    stratified_split,
    time_first,
)
from bestformer.data import download as download_mod
from bestformer.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from bestformer.data.idx import MNIST_MEAN, MNIST_STD
from bestformer.data.sources import save_cached
from bestformer.data.splits import plan_splits
from bestformer.data.static import DIGITS_MEAN, DIGITS_STD

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own decoded-data cache and data root, never the user's."""
    monkeypatch.setenv("BESTFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("BESTFORMER_DATA", str(tmp_path_factory.mktemp("data_root")))


# ------------------------------------------------------------------------------------------ file writers
def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX by hand: 00 00 type ndim, big-endian uint32 dims, big-endian data."""
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(dt).tobytes()


def nmnist_bytes(events: list[tuple[int, int, int, int]]) -> bytes:
    """N-MNIST by hand: x, y, then polarity in bit 23 and the 23-bit timestamp, big-endian."""
    out = b""
    for x, y, p, t in events:
        out += bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])
    return out


def aedat_bytes(raw_events: list[tuple[int, int, int, int]], version: str = "2.0") -> bytes:
    """AEDAT 2.0 by hand: '#' header lines, then big-endian (address, timestamp); DVS128 address
    polarity bit 0, x bits 1-7, y bits 8-14 (raw sensor coordinates)."""
    head = (f"#!AER-DAT{version}\r\n# This is a raw AE data file\r\n"
            "# Data format is int32 address, int32 timestamp (8 bytes total)\r\n").encode()
    return head + b"".join(struct.pack(">II", (yr << 8) | (xr << 1) | pol, t) for xr, yr, pol, t in raw_events)


def py2_cifar_pickle(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A CIFAR batch as Python 2's cPickle writes it (protocol 2, byte strings, numpy.core names)."""
    raw = data.tobytes()
    return b"".join([
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03",
        b"K\x00\x85q\x04U\x01b\x87q\x05Rq\x06(K\x01J", struct.pack("<i", data.shape[0]), b"J",
        struct.pack("<i", data.shape[1]), b"\x86cnumpy\ndtype\nq\x07U\x02u1K\x00K\x01\x87Rq\x08",
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T", struct.pack("<i", len(raw)), raw,
        b"tbU", bytes([len(label_key)]), label_key, b"]q\x09(", b"".join(b"K" + bytes([v]) for v in labels), b"eu.",
    ])


def write_tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ------------------------------------------------------------------------------------------------ splits
def test_stratified_split_is_disjoint_complete_seeded_and_proportional() -> None:
    labels = np.repeat(np.arange(5), [40, 30, 20, 7, 3])
    rest, carved = stratified_split(labels, 0.25, seed=3)
    assert np.intersect1d(rest, carved).size == 0
    assert np.array_equal(np.sort(np.concatenate([rest, carved])), np.arange(labels.size))
    assert carved.size == round(labels.size * 0.25)  # largest-remainder hits the global target exactly
    for c, n in enumerate([40, 30, 20, 7, 3]):
        assert abs(int((labels[carved] == c).sum()) - n * 0.25) < 1  # within one sample of the proportion
    again = stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(again[1], carved)
    assert not np.array_equal(stratified_split(labels, 0.25, seed=4)[1], carved)


def test_stratified_split_never_empties_a_class() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    rest, carved = stratified_split(labels, 0.9, seed=0)
    assert set(labels[rest].tolist()) == {0, 1, 2}
    assert 0 not in labels[carved]  # a single-sample class keeps its sample


def test_interleave_classes_round_robin_by_hand() -> None:
    labels = np.array([2, 0, 0, 1, 2, 0, 1])
    assert interleave_classes(np.arange(7), labels).tolist() == [1, 3, 0, 2, 6, 4, 5]


def test_plan_splits_limit_gives_class_balanced_prefix() -> None:
    labels = np.repeat(np.arange(4), 50)  # stored class by class, as folders are
    plan = plan_splits(labels, np.arange(200), None, val_fraction=0.1, seed=0, limit=8)
    assert np.bincount(labels[plan.train], minlength=4).tolist() == [2, 2, 2, 2]
    assert plan.val is not None and np.bincount(labels[plan.val], minlength=4).tolist() == [2, 2, 2, 2]
    assert np.intersect1d(plan.train, plan.val).size == 0
    with pytest.raises(InputError, match="empty validation split"):
        plan_splits(np.array([0, 1]), np.arange(2), None, val_fraction=0.1, seed=0)


# ---------------------------------------------------------------------------------------- event binning
def _frames_by_loops(x, y, p, t, T, H, W, split_by):
    """Independent reference: explicit loops over chunk boundaries written from the definition."""
    n = len(t)
    f = np.zeros((T, 2, H, W))
    order = sorted(range(n), key=lambda i: t[i]) if split_by == "number" else range(n)
    for rank, i in enumerate(order):
        if split_by == "number":
            chunk = n // T
            k = T - 1 if chunk == 0 else min(rank // chunk, T - 1)
        else:
            span = max(t) - min(t)
            k = 0 if span == 0 else min(int((t[i] - min(t)) * T // span), T - 1)
        f[k, p[i], y[i], x[i]] += 1
    return f


def test_events_to_frames_number_by_hand() -> None:
    # 7 events, T=3 -> chunks of 7 // 3 = 2: events {0,1}, {2,3}, {4,5,6} (the last takes the remainder)
    x = [0, 1, 1, 0, 2, 2, 2]
    y = [0, 0, 0, 1, 1, 1, 0]
    p = [1, 0, 0, 1, 1, 1, 0]
    t = [10, 20, 30, 40, 50, 60, 70]
    f = events_to_frames(x, y, p, t, time_steps=3, height=2, width=3)
    expected = torch.zeros(3, 2, 2, 3)
    expected[0, 1, 0, 0] = 1
    expected[0, 0, 0, 1] = 1
    expected[1, 0, 0, 1] = 1
    expected[1, 1, 1, 0] = 1
    expected[2, 1, 1, 2] = 2
    expected[2, 0, 0, 2] = 1
    assert f.dtype == torch.float32 and f.shape == (3, 2, 2, 3)
    assert torch.equal(f, expected)


def test_events_to_frames_time_by_hand() -> None:
    # span 0..100 us in T=4 windows [0,25) [25,50) [50,75) [75,100]: the last timestamp lands in frame 3
    t = [0, 24, 25, 74, 75, 100]
    f = events_to_frames([0] * 6, [0] * 6, [0, 1, 0, 0, 1, 1], t, time_steps=4, height=1, width=1, split_by="time")
    assert f[:, :, 0, 0].tolist() == [[1, 1], [1, 0], [1, 0], [0, 2]]
    # float timestamps (exactly representable here) give the same windows
    g = events_to_frames([0] * 6, [0] * 6, [0, 1, 0, 0, 1, 1], np.array(t, dtype=np.float64) / 8, 4, 1, 1, "time")
    assert torch.equal(f, g)


def test_events_to_frames_edge_cases() -> None:
    # fewer events than frames: the reference puts them all in the last frame
    f = events_to_frames([0, 0], [0, 0], [0, 1], [5, 6], time_steps=4, height=1, width=1)
    assert f[:, :, 0, 0].tolist() == [[0, 0], [0, 0], [0, 0], [1, 1]]
    # one shared timestamp, split by time: frame 0
    f = events_to_frames([0, 0], [0, 0], [0, 1], [5, 5], 3, 1, 1, "time")
    assert f[0, :, 0, 0].tolist() == [1, 1] and f.sum() == 2
    # no events: zero frames
    assert events_to_frames([], [], [], [], 2, 3, 3).abs().sum() == 0
    # out-of-order timestamps are chunked in time order
    a = events_to_frames([0, 1, 2, 3], [0] * 4, [0] * 4, [3, 1, 4, 2], 2, 1, 4)
    assert a[0, 0, 0].tolist() == [0, 1, 0, 1] and a[1, 0, 0].tolist() == [1, 0, 1, 0]


def test_events_to_frames_takes_timestamps_of_any_integer_or_float_dtype() -> None:
    # uint32 (AEDAT / jAER) out of order: sorted by time, as int64 is (np.diff wraps on unsigned, the bug)
    x, zeros = [0, 1, 2, 3], [0] * 4
    for dtype in (np.uint32, np.uint16, np.int64):
        f = events_to_frames(x, zeros, zeros, np.array([30, 20, 10, 0], dtype=dtype), 4, 1, 4)
        assert f[:, 0, 0].tolist() == np.eye(4)[::-1].tolist(), dtype  # frame k holds the event at t = 10 k
    # int16 / float16 spans beyond the dtype's range: windows as in int64 / float64 (an overflow before)
    for t in (np.array([-20000, 0, 20000], dtype=np.int16), np.array([-60000, 0, 60000], dtype=np.float16)):
        f = events_to_frames([0, 1, 2], [0] * 3, [0] * 3, t, 2, 1, 3, "time")
        assert f[:, 0, 0].tolist() == [[1, 0, 0], [0, 1, 1]], t.dtype


def test_events_to_frames_matches_loop_reference_on_random_events() -> None:
    rng = np.random.default_rng(1)
    for split_by in ("number", "time"):
        for n, T in ((0, 3), (5, 8), (200, 4), (1001, 7)):
            x, y, p = rng.integers(0, 5, n), rng.integers(0, 4, n), rng.integers(0, 2, n)
            t = np.sort(rng.integers(0, 10_000, n))
            got = events_to_frames(x, y, p, t, T, 4, 5, split_by)
            ref = _frames_by_loops(x.tolist(), y.tolist(), p.tolist(), t.tolist(), T, 4, 5, split_by)
            assert np.array_equal(got.numpy(), ref), (split_by, n, T)
            assert got.sum() == n


def test_events_to_frames_rejects_bad_events() -> None:
    with pytest.raises(InputError, match="event 1 has x=5"):
        events_to_frames([0, 5], [0, 0], [0, 0], [0, 1], 2, 2, 5)
    with pytest.raises(InputError, match="p=2"):
        events_to_frames([0], [0], [2], [0], 2, 2, 2)
    with pytest.raises(InputError, match="one entry per event"):
        events_to_frames([0, 1], [0], [0], [0], 2, 2, 2)
    with pytest.raises(InputError, match="integers"):
        events_to_frames([0.5], [0], [0], [0], 2, 2, 2)
    with pytest.raises(InputError, match="NaN"):
        events_to_frames([0], [0], [0], [float("nan")], 2, 2, 2, "time")
    with pytest.raises(ConfigError, match="time_steps"):
        events_to_frames([0], [0], [0], [0], 0, 2, 2)
    with pytest.raises(ConfigError, match="split_by"):
        events_to_frames([0], [0], [0], [0], 2, 2, 2, split_by="count")


def test_time_first() -> None:
    x = torch.arange(2 * 3 * 2 * 4 * 4, dtype=torch.float32).view(2, 3, 2, 4, 4)  # [B, T, C, H, W]
    y = time_first(x)
    assert y.shape == (3, 2, 2, 4, 4) and torch.equal(y[1, 0], x[0, 1])
    img = torch.zeros(2, 3, 8, 8)
    assert time_first(img) is img
    with pytest.raises(InputError, match="B, T, C, H, W"):
        time_first(torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------- N-MNIST / AEDAT
def test_decode_nmnist_hand_built() -> None:
    data = nmnist_bytes([(3, 5, 1, 0x012345), (33, 0, 0, 0x7FFFFF)])
    assert data[:5] == bytes([3, 5, 0x81, 0x23, 0x45])
    ev = decode_nmnist(data)
    assert ev.x.tolist() == [3, 33] and ev.y.tolist() == [5, 0]
    assert ev.p.tolist() == [1, 0] and ev.t.tolist() == [0x012345, 0x7FFFFF]


def test_decode_nmnist_overflow_marker_adds_2_pow_13() -> None:
    ev = decode_nmnist(nmnist_bytes([(1, 1, 0, 100), (0, 240, 0, 0), (2, 2, 1, 50), (0, 240, 0, 0), (3, 3, 0, 7)]))
    assert ev.x.tolist() == [1, 2, 3]
    assert ev.t.tolist() == [100, 50 + 8192, 7 + 2 * 8192]


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty"),
    (nmnist_bytes([(1, 1, 0, 5)])[:-1], "not a multiple of 5"),
    (nmnist_bytes([(1, 1, 0, 5), (34, 0, 0, 6)]), "event 1 is at x=34"),
    (nmnist_bytes([(0, 240, 0, 0)]), "no events"),
])
def test_decode_nmnist_errors(data: bytes, match: str) -> None:
    with pytest.raises(FileFormatError, match=match):
        decode_nmnist(data, "rec.bin")


def test_decode_aedat_hand_built_uses_reference_orientation() -> None:
    ev = decode_aedat(aedat_bytes([(10, 20, 1, 1000), (127, 0, 0, 2000)]))
    # x = 127 - y_raw, y = 127 - x_raw, p = 1 - bit0 (SpikingJelly's CIFAR10DVS loader)
    assert ev.x.tolist() == [107, 127] and ev.y.tolist() == [117, 0]
    assert ev.p.tolist() == [0, 1] and ev.t.tolist() == [1000, 2000]


@pytest.mark.parametrize(("data", "match"), [
    (b"\x00" * 16, "does not start with"),
    (aedat_bytes([(1, 1, 1, 1)], version="3.1"), "version '3.1'"),
    (aedat_bytes([]), "no events"),
    (aedat_bytes([(1, 1, 1, 1)])[:-3], "not a multiple of 8"),
    (b"#!AER-DAT2.0\r\n# unterminated", "header does not end"),
])
def test_decode_aedat_errors(data: bytes, match: str) -> None:
    with pytest.raises(FileFormatError, match=match):
        decode_aedat(data, "rec.aedat")


# ------------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("type_code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_idx_round_trip_every_type(type_code: int) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.float64)
    if type_code == 0x08:
        arr = np.abs(arr)
    got = parse_idx(idx_bytes(arr, type_code))
    assert got.shape == (2, 3, 4) and np.array_equal(got, arr) and got.dtype.isnative
    assert np.array_equal(parse_idx(gzip.compress(idx_bytes(arr, type_code))), arr)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: b[:3] + b"\x00" + b[4:], "not an IDX file"),
    (lambda b: b[:4] + struct.pack(">I", 10**9) + b[8:], "declares dimensions"),
    (lambda b: gzip.compress(b)[:-6], "gzip"),
])
def test_idx_errors(mutate, match: str, tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 2, 2), np.uint8))))
    with pytest.raises(FileFormatError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def _mnist_dir(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, side: int = 6) -> Path:
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side)).astype(np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in parts.items():
        data = idx_bytes(arr)
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return root


def test_mnist_from_synthetic_idx(tmp_path: Path) -> None:
    root = _mnist_dir(tmp_path / "m")
    b = build_datasets("mnist", root, val_fraction=0.25, seed=1)
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20)
    assert (b.num_classes, b.in_channels, b.img_size, b.is_event) == (10, 1, 6, False)
    images = parse_idx(gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes()))
    x, y = b.train[0]
    j = int(b.train.indices[0])
    expected = (torch.from_numpy(images[j].astype(np.float32)) / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert x.shape == (1, 6, 6) and torch.allclose(x[0], expected) and y == j % 10
    # the same data uncompressed, and torchvision's MNIST/raw layout, give the same split
    c = build_datasets("mnist", _mnist_dir(tmp_path / "u" / "MNIST" / "raw", gz=False).parents[1],
                       val_fraction=0.25, seed=1)
    assert np.array_equal(c.val.indices, b.val.indices)


def test_mnist_errors_name_the_file(tmp_path: Path) -> None:
    root = _mnist_dir(tmp_path / "m", gz=False)
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 12] + [0] * 17, np.uint8)))
    with pytest.raises(FileFormatError, match=r"t10k-labels-idx1-ubyte: label 12 of sample 2 is out of range"):
        build_datasets("mnist", root)
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(FileFormatError, match="20 images but .* 19 labels"):
        build_datasets("mnist", root)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileFormatError, match=r"t10k-labels-idx1-ubyte\(\.gz\) not found"):
        build_datasets("mnist", root)


def test_mnist_download_is_offline_testable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True fetches from the (here local, file://) mirror, checks MD5s, writes atomically."""
    mirror = _mnist_dir(tmp_path / "mirror")
    files = tuple((n, hashlib.md5((mirror / n).read_bytes()).hexdigest()) for n in sorted(os.listdir(mirror)))
    monkeypatch.setitem(download_mod.RESOURCES, "mnist", (("file://" + str(mirror) + "/",), files))
    target = tmp_path / "dl"
    b = build_datasets("mnist", target, download=True, val_fraction=0.25)
    assert len(b.test) == 20 and sorted(os.listdir(target)) == [n for n, _ in files]
    bad = tuple((n, "0" * 32) for n, _ in files)
    monkeypatch.setitem(download_mod.RESOURCES, "mnist", (("file://" + str(mirror) + "/",), bad))
    with pytest.raises(FileFormatError, match="MD5"):
        build_datasets("mnist", tmp_path / "dl2", download=True)
    assert not any((tmp_path / "dl2").iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------------- CIFAR
def _cifar_arrays(n: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072)).astype(np.uint8), [(seed + i) % num_classes for i in range(n)]


def test_parse_cifar_batch_pixel_layout_and_all_pickle_protocols() -> None:
    data, labels = _cifar_arrays(4, 0)
    for blob in [py2_cifar_pickle(data, labels)] + [pickle.dumps({"data": data, "labels": labels}, protocol=k)
                                                   for k in (2, 3, 4, 5)]:
        images, got = parse_cifar_batch(blob, "batch", "labels", 10)
        assert got.tolist() == labels and images.shape == (4, 32, 32, 3)
        # row layout: 1024 red, then 1024 green, then 1024 blue, each row-major 32 x 32
        assert images[2, 5, 7, 0] == data[2, 5 * 32 + 7]
        assert images[2, 5, 7, 1] == data[2, 1024 + 5 * 32 + 7]
        assert images[2, 31, 0, 2] == data[2, 2048 + 31 * 32]


def test_py2_pickle_helper_is_what_numpy_reads() -> None:
    """The hand-built Python 2 pickle is a genuine numpy pickle: plain pickle with numpy reads it the same."""
    data, labels = _cifar_arrays(3, 1)
    ref = pickle.loads(py2_cifar_pickle(data, labels), encoding="latin1")
    assert np.array_equal(ref["data"], data) and ref["labels"] == labels


def test_safe_unpickle_refuses_code_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(FileFormatError, match="refusing to load"):
        safe_unpickle(pickle.dumps({"data": Evil()}), "evil_batch")
    assert not marker.exists()
    with pytest.raises(FileFormatError, match="not a plain numeric type"):
        safe_unpickle(pickle.dumps(np.array([1, 2], dtype=object), protocol=2))


@pytest.mark.parametrize(("batch", "match"), [
    ({"labels": [0]}, "no 'data' entry"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
    ({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}, "label 10 of sample 0 is out of range"),
    ({"data": np.zeros((1, 3071), np.uint8), "labels": [0]}, r"uint8 \[N, 3072\]"),
    ({"data": np.zeros((1, 3072), np.float32), "labels": [0]}, r"uint8 \[N, 3072\]"),
    ([1, 2], "expected a dict"),
])
def test_parse_cifar_batch_errors(batch: object, match: str) -> None:
    with pytest.raises(FileFormatError, match=match):
        parse_cifar_batch(pickle.dumps(batch, protocol=2), "data_batch_1", "labels", 10)


def _cifar10_pickle_files(n: int = 6) -> dict[str, bytes]:
    files = {}
    for i in range(1, 6):
        data, labels = _cifar_arrays(n, i)
        files[f"cifar-10-batches-py/data_batch_{i}"] = py2_cifar_pickle(data, labels)
    data, labels = _cifar_arrays(n, 9)
    files["cifar-10-batches-py/test_batch"] = py2_cifar_pickle(data, labels)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": CIFAR10_NAMES}, protocol=2)
    return files


def test_cifar10_from_pickle_folder_and_canonical_tar_gz(tmp_path: Path) -> None:
    files = _cifar10_pickle_files()
    a = build_datasets("cifar10", write_files(tmp_path / "dir", files), val_fraction=0.2)
    b = build_datasets("cifar10", write_tar_gz(tmp_path / "cifar-10-python.tar.gz", files), val_fraction=0.2)
    assert (len(a.train), len(a.val), len(a.test)) == (24, 6, 6)
    assert a.class_names == CIFAR10_NAMES and (a.in_channels, a.img_size) == (3, 32)
    for i in range(len(a.train)):
        xa, ya = a.train[i]
        xb, yb = b.train[i]
        assert ya == yb and torch.equal(xa, xb)
    # the first test item is the first sample of class 0 in test_batch (interleaved order)
    data, labels = _cifar_arrays(6, 9)
    j = labels.index(0)
    x, y = a.test[0]
    pixel = data[j].reshape(3, 32, 32).astype(np.float32) / 255
    expected = (torch.from_numpy(pixel) - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(
        CIFAR10_STD).view(3, 1, 1)
    assert y == 0 and torch.allclose(x, expected)


def test_cifar10_class_names_written_as_bytes(tmp_path: Path) -> None:
    files = _cifar10_pickle_files()  # a Python 3 writer of the old format: bytes keys and bytes names
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": [n.encode() for n in CIFAR10_NAMES]}, protocol=2)
    assert build_datasets("cifar10", write_files(tmp_path, files), val_fraction=0.2).class_names == CIFAR10_NAMES


def test_cifar100_pickles_use_fine_labels(tmp_path: Path) -> None:
    data, fine = _cifar_arrays(200, 0, num_classes=100)
    tdata, tfine = _cifar_arrays(100, 3, num_classes=100)
    names = [f"class{i:03d}" for i in range(100)]
    files = {"cifar-100-python/train": py2_cifar_pickle(data, fine, b"fine_labels"),
             "cifar-100-python/test": py2_cifar_pickle(tdata, tfine, b"fine_labels"),
             "cifar-100-python/meta": pickle.dumps({"fine_label_names": names, "coarse_label_names": []})}
    b = build_datasets("cifar100", write_files(tmp_path, files), val_fraction=0.5)
    assert b.num_classes == 100 and b.class_names == names and (len(b.train), len(b.val)) == (100, 100)
    assert sorted(int(b.train.labels[i]) for i in b.train.indices) == list(range(100))


def _cifar_folder_files(per_class: int, classes=CIFAR10_NAMES, split: str = "train", size: int = 32
                        ) -> dict[str, bytes]:
    rng = np.random.default_rng(len(split))
    return {f"{split}/{c}/{k:04d}.png": png_bytes(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))
            for c in classes for k in range(per_class)}


def test_cifar10_image_folder_from_tar_gz_and_decoded_cache(tmp_path: Path) -> None:
    files = _cifar_folder_files(3)
    archive = write_tar_gz(tmp_path / "cifar10-train-png.tar.gz", files)
    cache = Path(os.environ["BESTFORMER_CACHE"])
    b = build_datasets("cifar10", archive, val_fraction=0.34)
    assert b.test is None and (len(b.train), len(b.val)) == (20, 10)
    assert b.class_names == CIFAR10_NAMES  # label = alphabetical class index
    assert len(list(cache.glob("cifar10-*.npz"))) == 1  # complete decode -> cached
    x, y = b.train[0]
    name = f"train/{CIFAR10_NAMES[y]}/{int(b.train.indices[0]) % 3:04d}.png"
    pixel = np.asarray(Image.open(io.BytesIO(files[name]))).astype(np.float32) / 255
    expected = (torch.from_numpy(pixel).permute(2, 0, 1) - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(
        CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(x, expected)
    c = build_datasets("cifar10", archive, val_fraction=0.34)
    assert "decoded cache" in c.source
    assert all(torch.equal(c.train[i][0], b.train[i][0]) for i in range(len(b.train)))
    # a corrupt cache file is ignored (and rewritten); a changed source (new mtime) is not served from the cache
    next(cache.glob("cifar10-*.npz")).write_bytes(b"PK\x03\x04 broken")
    assert "decoded cache" not in build_datasets("cifar10", archive, val_fraction=0.34).source
    assert "decoded cache" in build_datasets("cifar10", archive, val_fraction=0.34).source
    os.utime(archive, ns=(1, 1))
    assert "decoded cache" not in build_datasets("cifar10", archive, val_fraction=0.34).source
    # a cache whose train count disagrees with its labels (stale or damaged) is rebuilt, not indexed past its end
    for old in cache.glob("cifar10-*.npz"):  # the entries of the earlier mtime too: keep the source's current one
        old.unlink()
    build_datasets("cifar10", archive, val_fraction=0.34)
    (path,) = cache.glob("cifar10-*.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    for n_train in (len(arrays["labels"]) + 5, 0, -1):
        save_cached(path.name, **{**arrays, "n_train": np.int64(n_train)})
        rebuilt = build_datasets("cifar10", archive, val_fraction=0.34)
        assert "decoded cache" not in rebuilt.source and (len(rebuilt.train), len(rebuilt.val)) == (20, 10)


def test_a_source_changing_while_it_is_decoded_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The cache key is taken before the files are listed: an image added during the decode (a copy finishing)
    must not have the old listing saved under the new data's key, to be served from then on."""
    import bestformer.data.cifar as cifar

    root = write_files(tmp_path / "folder", _cifar_folder_files(2))
    decode = cifar._decode_folder_images

    def decode_while_a_file_arrives(*args, **kwargs):
        out = decode(*args, **kwargs)
        (root / "train" / "cat" / "0009.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
        return out

    monkeypatch.setattr(cifar, "_decode_folder_images", decode_while_a_file_arrives)
    assert len(build_datasets("cifar10", root, val_fraction=0.5).train) == 10  # the listing it started with
    monkeypatch.setattr(cifar, "_decode_folder_images", decode)
    assert not list(Path(os.environ["BESTFORMER_CACHE"]).glob("*.npz"))
    now = build_datasets("cifar10", root, val_fraction=0.5)
    assert "decoded cache" not in now.source and len(now.train) + len(now.val) == 21


def test_cifar10_image_folder_max_per_class_and_test_folder(tmp_path: Path) -> None:
    files = {**_cifar_folder_files(4), **_cifar_folder_files(2, split="test")}
    root = write_files(tmp_path / "folder", files)
    b = build_datasets("cifar10", root, max_per_class=2, val_fraction=0.5)
    assert (len(b.train), len(b.val), len(b.test)) == (10, 10, 20)
    assert not list(Path(os.environ["BESTFORMER_CACHE"]).glob("*.npz"))  # partial decode is never cached
    # only files 0000 and 0001 of each class were used: image 0003 of 'cat' may be corrupt without harm
    (root / "train/cat/0003.png").write_bytes(b"not an image")
    build_datasets("cifar10", root, max_per_class=2)


@pytest.mark.parametrize(("files", "match"), [
    (_cifar_folder_files(1, CIFAR10_NAMES[:9]), "found 9 class folders, expected 10"),
    ({**_cifar_folder_files(2), "train/cat/0000.png": b"\xff\xd8 garbage"}, r"cannot decode image .*cat/0000\.png"),
    ({**_cifar_folder_files(2), "train/dog/0000.png": png_bytes(np.zeros((8, 8, 3), np.uint8))},
     r"dog/0000\.png is 8x8; CIFAR images are 32x32"),
    ({**_cifar_folder_files(2), **_cifar_folder_files(1, [*CIFAR10_NAMES[:9], "zebra"], split="test")},
     r"differ from the training classes \(unexpected \['zebra'\], missing \['truck'\]\)"),
])
def test_cifar_folder_errors(files: dict[str, bytes], match: str, tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=match):
        build_datasets("cifar10", write_files(tmp_path, files), val_fraction=0.5)


# ------------------------------------------------------------------------------------------------ imagefolder
def test_imagefolder_resize_crop_and_split_policy(tmp_path: Path) -> None:
    img = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: short side 8 -> 4, width 16 -> 8, crop columns 2..5
    img[:, 2:14] = 255  # black borders: a crop that is not central (or no crop) would show them
    files = {f"train/{c}/{k}.png": png_bytes(img) for c in ("a", "b") for k in range(5)}
    files.update({f"val/{c}/{k}.png": png_bytes(img) for c in ("a", "b") for k in range(2)})
    b = build_datasets("imagefolder", write_files(tmp_path, files), img_size=4, val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (8, 2, 4)  # val/ is the test split, val carved from train
    assert b.class_names == ["a", "b"] and b.img_size == 4
    x, _ = b.test[0]
    white = (1.0 - torch.tensor(b.mean)) / torch.tensor(b.std)
    assert x.shape == (3, 4, 4) and torch.allclose(x, white.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)
    # with train / val / test all published, val/ is the validation split and nothing is carved
    files.update({f"test/{c}/{k}.png": png_bytes(img) for c in ("a", "b") for k in range(3)})
    c = build_datasets("imagefolder", write_files(tmp_path, files), img_size=4)
    assert (len(c.train), len(c.val), len(c.test)) == (10, 4, 6)


def test_an_empty_class_folder_is_refused_in_a_folder_and_an_archive(tmp_path: Path) -> None:
    """A class folder with no file at all (a failed copy) would silently drop a class and shift every label after
    it: refused, from a folder and from a tar archive (which records the empty folder as a member)."""
    files = {f"{s}/{c}/{k}.png": png_bytes(np.zeros((4, 4, 3), np.uint8)) for s in ("train", "val")
             for c in ("a", "c") for k in range(3)}
    root = write_files(tmp_path / "d", files)
    (root / "train" / "b").mkdir()
    (root / "val" / "b").mkdir()
    with pytest.raises(FileFormatError, match=r"train/b: class folder holds no image files"):
        build_datasets("imagefolder", root, img_size=4)
    with tarfile.open(tmp_path / "d.tar", "w") as tf:
        tf.add(root, arcname="d")
    with pytest.raises(FileFormatError, match=r"/b: class folder holds no image files"):
        build_datasets("imagefolder", tmp_path / "d.tar", img_size=4)
    (root / "train" / ".cache").mkdir()  # hidden folders are not classes
    (root / "test").mkdir()  # an empty split folder is no split (val/ stays the test split)
    (root / "train" / "b" / "0.png").write_bytes(files["train/a/0.png"])
    (root / "val" / "b" / "0.png").write_bytes(files["train/a/0.png"])
    b = build_datasets("imagefolder", root, img_size=4)
    assert b.class_names == ["a", "b", "c"] and len(b.test) == 7


def test_imagefolder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    files = {f"train/{c}/{k}.jpg": png_bytes(np.zeros((4, 4, 3), np.uint8)) for c in ("a", "b") for k in range(5)}
    files["train/b/0.jpg"] = b"\xff\xd8\xff\xe0 truncated jpeg"
    b = build_datasets("imagefolder", write_files(tmp_path, files), img_size=4, val_fraction=0.2)
    bad = [i for i, n in enumerate(b.train.names) if n.endswith("b/0.jpg")]
    b.train[(bad[0] + 1) % len(b.train)]  # the others decode
    with pytest.raises(FileFormatError, match=r"cannot decode image .*train/b/0\.jpg"):
        b.train[bad[0]]


# ------------------------------------------------------------------------------------------- event datasets
def _nmnist_files(per_class: int, top: str = "NMNIST-small/") -> tuple[dict[str, bytes], dict[str, list]]:
    rng = np.random.default_rng(0)
    files, events = {}, {}
    for split, n in (("Train", per_class), ("Test", 1)):
        for d in range(10):
            for k in range(n):
                m = int(rng.integers(5, 30))
                ev = sorted(zip(rng.integers(0, 34, m).tolist(), rng.integers(0, 34, m).tolist(),
                                rng.integers(0, 2, m).tolist(), rng.integers(0, 300_000, m).tolist()),
                            key=lambda e: e[3])
                name = f"{top}{split}/{d}/{split[0]}{k:05d}.bin"
                files[name], events[name] = nmnist_bytes(ev), ev
    return files, events


def test_nmnist_from_tar_gz_frames_match_events(tmp_path: Path) -> None:
    files, events = _nmnist_files(3)
    b = build_datasets("nmnist", write_tar_gz(tmp_path / "nmnist-small.tar.gz", files), time_steps=5,
                       val_fraction=1 / 3)
    assert (len(b.train), len(b.val), len(b.test)) == (20, 10, 10)
    assert (b.is_event, b.in_channels, b.img_size, b.num_classes) == (True, 2, 34, 10)
    for split in (b.train, b.test):
        for i in range(len(split)):
            x, y = split[i]
            ev = events[split.names[i]]
            xs, ys, ps, ts = (list(v) for v in zip(*ev))
            assert y == int(split.names[i].split("/")[-2])
            assert np.array_equal(x.numpy(), _frames_by_loops(xs, ys, ps, ts, 5, 34, 34, "number"))
    tb = build_datasets("nmnist", tmp_path / "nmnist-small.tar.gz", time_steps=3, split_by="time")
    x, _ = tb.train[0]
    ev = events[tb.train.names[0]]
    xs, ys, ps, ts = (list(v) for v in zip(*ev))
    assert np.array_equal(x.numpy(), _frames_by_loops(xs, ys, ps, ts, 3, 34, 34, "time"))


def test_nmnist_batches_feed_a_model(tmp_path: Path) -> None:
    files, _ = _nmnist_files(2, top="")
    b = build_datasets("nmnist", write_files(tmp_path, files), time_steps=2, val_fraction=0.5)
    x, y = next(iter(DataLoader(b.train, batch_size=3)))
    assert x.shape == (3, 2, 2, 34, 34) and y.dtype == torch.int64
    model = create_model("bestformer_tiny", in_channels=b.in_channels, img_size=b.img_size,
                         num_classes=b.num_classes, time_steps=2).eval()
    with torch.no_grad():
        out = model(time_first(x))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_nmnist_corrupt_recording_names_the_file(tmp_path: Path) -> None:
    files, _ = _nmnist_files(1, top="")
    files["Train/4/T00000.bin"] = files["Train/4/T00000.bin"][:-2]
    b = build_datasets("nmnist", write_files(tmp_path, files), val_fraction=0, limit=10)
    i = b.train.names.index("Train/4/T00000.bin")
    with pytest.raises(FileFormatError, match=r"Train/4/T00000\.bin is truncated"):
        b.train[i]


def test_cifar10dvs_split_per_class_and_frames_by_hand(tmp_path: Path) -> None:
    files = {}
    for c in CIFAR10_NAMES:
        for k in range(11):  # 11 recordings: ceil(0.9 * 11) = 10 train, 1 test per class
            files[f"CIFAR10-DVS/{c}/cifar10_{c}_{k}.aedat"] = aedat_bytes([(k % 128, 3, 1, 10), (0, 0, 0, 20)])
    b = build_datasets("cifar10dvs", write_tar_gz(tmp_path / "dvs.tar.gz", files), time_steps=2, val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (80, 20, 10)
    assert b.class_names == CIFAR10_NAMES and b.img_size == 128 and b.in_channels == 2
    # sorted file order is lexicographic (0, 1, 10, 2, ..., 9), so recording 9 is each class's test sample
    assert all(name.endswith("_9.aedat") for name in b.test.names)
    x, y = b.test[0]
    assert y == 0 and x.shape == (2, 2, 128, 128) and x.sum() == 2
    # event 1 (frame 0): raw x=9, y=3, bit0=1 -> x = 127 - 3, y = 127 - 9, p = 0; event 2 (frame 1): raw 0,0,0
    assert x[0, 0, 127 - 9, 127 - 3] == 1 and x[1, 1, 127, 127] == 1


def test_cifar10dvs_wrong_class_count(tmp_path: Path) -> None:
    files = {f"{c}/r0.aedat": aedat_bytes([(1, 1, 1, 1)]) for c in CIFAR10_NAMES[:7]}
    with pytest.raises(FileFormatError, match="found 7 class folders, expected 10"):
        build_datasets("cifar10dvs", write_files(tmp_path, files))


# ----------------------------------------------------------------------------------- digits and the registry
def test_digits_splits_and_normalization() -> None:
    from sklearn.datasets import load_digits

    a = build_datasets("digits", seed=0)
    b = build_datasets("digits", seed=1)
    assert (len(a.train) + len(a.val) + len(a.test)) == 1797 and len(a.test) == round(1797 * 0.2)
    assert np.array_equal(np.sort(a.test.indices), np.sort(b.test.indices))  # the test carve never moves
    assert not np.array_equal(np.sort(a.val.indices), np.sort(b.val.indices))
    assert np.intersect1d(a.train.indices, np.concatenate([a.val.indices, a.test.indices])).size == 0
    raw = load_digits().images / 16.0
    assert abs(raw.mean() - DIGITS_MEAN[0]) < 1e-4 and abs(raw.std() - DIGITS_STD[0]) < 1e-4
    x, y = a.test[3]
    j = int(a.test.indices[3])
    assert y == load_digits().target[j]
    assert torch.allclose(x[0], (torch.from_numpy(raw[j]).float() - DIGITS_MEAN[0]) / DIGITS_STD[0])
    assert a.val is not None and build_datasets("digits", val_fraction=0).val is None
    lim = build_datasets("digits", limit=20)
    assert len(lim.train) == len(lim.val) == len(lim.test) == 20
    assert np.bincount(lim.train.labels[lim.train.indices]).tolist() == [2] * 10


def test_registry_and_option_errors(tmp_path: Path) -> None:
    assert list_datasets() == ["cifar10", "cifar100", "cifar10dvs", "digits", "imagefolder", "mnist", "nmnist"]
    assert list_datasets("cifar*") == ["cifar10", "cifar100", "cifar10dvs"]
    with pytest.raises(ConfigError, match="did you mean 'mnist'"):
        build_datasets("mnsit")
    for kwargs, match in ((dict(time_steps=0), "time_steps"), (dict(split_by="count"), "split_by"),
                          (dict(val_fraction=1.0), "val_fraction"), (dict(limit=0), "limit"),
                          (dict(seed=-1), "seed"), (dict(max_per_class=1.5), "max_per_class")):
        with pytest.raises(ConfigError, match=match):
            build_datasets("digits", **kwargs)
    with pytest.raises(ConfigError, match="img_size applies to imagefolder only"):
        build_datasets("mnist", tmp_path, img_size=32)
    with pytest.raises(ConfigError, match="reads no files"):
        build_datasets("digits", tmp_path)
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        build_datasets("nmnist", tmp_path, download=True)
    with pytest.raises(FileFormatError, match="does not exist"):
        build_datasets("nmnist", tmp_path / "nowhere")
    with pytest.raises(FileFormatError, match="no N-MNIST data found"):
        build_datasets("nmnist", write_files(tmp_path / "wrong", {"readme.txt": b"hi"}))
    with pytest.raises(FileFormatError, match="not a tar archive"):
        build_datasets("nmnist", write_files(tmp_path, {"x.tar.gz": b"\x1f\x8b garbage"}) / "x.tar.gz")


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.data
def test_real_mnist(shared_data: Path) -> None:
    b = build_datasets("mnist", shared_data / "mnist")
    assert len(b.train) + len(b.val) == 60_000 and len(b.test) == 10_000 and b.img_size == 28
    assert abs(b.train.images[:60_000].mean() / 255 - MNIST_MEAN[0]) < 1e-4
    labels = b.test.labels[b.test.indices]
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).min() > 800


@pytest.mark.data
def test_real_cifar10_jpeg_first_per_class(shared_data: Path) -> None:
    b = build_datasets("cifar10", shared_data / "cifar10", max_per_class=3, val_fraction=1 / 3)
    assert b.test is None and (len(b.train), len(b.val)) == (20, 10)
    assert b.class_names == CIFAR10_NAMES
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and y == 0 and -2.5 < float(x.min()) < float(x.max()) < 2.5


@pytest.mark.data
def test_real_nmnist(shared_data: Path) -> None:
    b = build_datasets("nmnist", shared_data / "nmnist", time_steps=4)
    assert len(b.train) + len(b.val) == 1000 and len(b.test) == 100
    assert sorted(set(b.test.labels.tolist())) == list(range(10))
    x, y = b.test[0]
    ev = b.test.events(0)
    assert x.shape == (4, 2, 34, 34) and y == 0 and x.sum() == len(ev.t)
    assert ev.t.max() <= 336_040 and (np.diff(ev.t) >= 0).all()
