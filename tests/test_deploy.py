"""Deployment: BatchNorm/lambda folding, the packed .bst file, the bit-packed runtime, the CLI and NIR export.

Exactness is tested on models whose first (full-precision) convolution is exact in float32 in any summation
order (weights on a 2^-8 grid, inputs on a 2^-4 grid, or event counts): then every spike of the packed runtime
must equal PyTorch's, and the logits may differ only by PyTorch's float32 rounding of the token/time mean and the
heads, bounded by :func:`logit_bound` (one flipped spike moves a logit by ~1e-2, the bound is ~1e-5).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from numba import njit

import bestformer
from bestformer.cli import main as cli_main
from bestformer.deploy import kernels as K
from bestformer.deploy.c_build import find_compiler
from bestformer.deploy.fold import bn_constants, export_packed, fold_batchnorm, fold_model, neuron_modules
from bestformer.deploy.packfile import DIGEST_SIZE, FORMAT_VERSION, encode_packed, read_packed
from bestformer.deploy.runtime import PackedModel
from bestformer.errors import ConfigError, FileFormatError, InputError
from bestformer.hardware import cpu_info
from bestformer.neurons import LIF

U = 2.0**-24  # float32 unit roundoff
THREADS = 2


# ------------------------------------------------------------------------------------------------ helpers
def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def make_model(seed: int = 0, events: bool = False, **overrides) -> torch.nn.Module:
    """A small bestformer with data-calibrated BatchNorm statistics, perturbed affine parameters and lambda, and a
    first convolution on a 2^-8 grid (exact in float32 for the grid inputs of :func:`grid_input`)."""
    torch.manual_seed(seed)
    args = dict(img_size=12, embed_dim=32, num_heads=2, depth=2, time_steps=3)
    args.update(overrides)
    model = bestformer.create_model("bestformer_tiny", **args)
    x = grid_input(model, 8, seed=seed + 100, events=events)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 2.0)
                mod.weight.mul_(torch.where(torch.rand_like(mod.weight) < 0.1, -1.0, 1.0))  # some negative gammas
                mod.bias.normal_(0.5, 0.5)
            if hasattr(mod, "lam"):
                mod.lam.uniform_(0.5, 2.0)
        conv = model.patch_embed.proj.conv
        conv.weight.copy_(torch.round(conv.weight * 256) / 256)
    return model.eval()


def grid_input(model: torch.nn.Module, batch: int, seed: int = 1, events: bool = False) -> torch.Tensor:
    """Static images on a 2^-4 grid in [-2, 2], or event-count frames ``[T, B, C, H, W]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.img_size, model.img_size)
    if events:
        return torch.randint(0, 4, (model.time_steps, batch, *shape), generator=g).float()
    return torch.randint(-32, 33, (batch, *shape), generator=g).float() / 16


def torch_reference(model: torch.nn.Module, x: torch.Tensor, hooks: bool = True
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One eval forward: the logits, the output of every LIF module (forward hooks) and :func:`logit_bound`."""
    spikes: dict[str, np.ndarray] = {}

    def keep(name: str):
        return lambda _module, _inputs, out: spikes.__setitem__(name, out.numpy().astype(np.uint8))

    handles = [mod.register_forward_hook(keep(name)) for name, mod in model.named_modules()
               if isinstance(mod, LIF) and hooks]
    try:
        with torch.no_grad():
            streams = model.forward_streams(x)
            logits = model.forward_head(torch.stack([s.mean(dim=(0, 2)) for s in streams], dim=1)).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, spikes, logit_bound(model, [s.double() for s in streams])


def logit_bound(model: torch.nn.Module, streams: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """``(exact, tol)``: the logits in float64 from PyTorch's own float32 token streams, and a rigorous bound on
    |PyTorch - exact| + |packed - exact| when both compute the same streams.

    PyTorch's pooled feature (a float32 sum of n = T*N terms in any order, then /n) is within
    ``e = gamma_n mean|x|`` of the exact mean; a float32 matrix-vector product within
    ``gamma_(D+1) (|W| |f| + |b|)`` plus ``|W| e``; averaging two heads or two streams adds ``u |y|``. The packed
    runtime pools and applies the heads in float64 and rounds once: ``u |y|``.
    """
    t_steps, _, n, d = streams[0].shape
    feats = [s.mean(dim=(0, 2)) for s in streams]
    errs = [gamma(t_steps * n) * s.abs().mean(dim=(0, 2)) for s in streams]

    def head(layer: torch.nn.Module, f: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        y = f @ w.T + b
        return y, e @ w.abs().T + gamma(d + 1) * (f.abs() @ w.abs().T + b.abs()) * (1 + 1e-6)

    if model.head_dist is not None:
        (y0, t0), (y1, t1) = head(model.head, feats[0], errs[0]), head(model.head_dist, feats[-1], errs[-1])
        y, tol = (y0 + y1) / 2, (t0 + t1) / 2
    else:
        f, e = sum(feats) / len(feats), sum(errs) / len(errs)
        y, tol = head(model.head, f, e + U * f.abs())
    tol = tol + 3 * U * y.abs()
    return y.numpy(), tol.numpy()


def packed(model: torch.nn.Module) -> PackedModel:
    return PackedModel(fold_model(model), threads=THREADS)


def assert_same_spikes(model: torch.nn.Module, pm: PackedModel, x: torch.Tensor) -> dict[str, float]:
    ref, ref_spikes, (exact, tol) = torch_reference(model, x)
    logits, spikes = pm.run(x.numpy(), trace=True)
    names = neuron_modules(model)
    assert set(spikes) == set(names)
    rates = {}
    for short, module in names.items():
        assert spikes[short].shape == ref_spikes[module].shape, short
        mismatches = int((spikes[short] != ref_spikes[module]).sum())
        assert mismatches == 0, f"{short} ({module}): {mismatches} spikes differ from PyTorch"
        rates[short] = float(spikes[short].mean())
    assert np.all(np.abs(logits - ref) <= tol), f"max |diff| {np.abs(logits - ref).max():.3g} > bound {tol.min():.3g}"
    assert np.all(np.abs(logits - exact) <= tol)
    return rates


# ------------------------------------------------------------------------------------------------ folding
def test_bn_constants_hand_computed():
    bn = torch.nn.BatchNorm1d(2, eps=1.0).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0]))
        bn.bias.copy_(torch.tensor([0.5, 1.0]))
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([3.0, 15.0]))
    alpha, beta = bn_constants(bn)
    # alpha = gamma / sqrt(var + eps) = (2/2, -3/4); b = beta - mu alpha = (0.5 - 1, 1 - 1.5)
    np.testing.assert_array_equal(alpha, np.array([1.0, -0.75], np.float32))
    np.testing.assert_array_equal(beta, np.array([-0.5, -0.5], np.float32))


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_fold_batchnorm_is_bit_exact_on_every_integer(kind):
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm1d(37) if kind == "1d" else torch.nn.BatchNorm2d(37)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_(0, 5)
        bn.running_var.uniform_(0.01, 30)
    bn.eval()
    alpha, beta, rounding = fold_batchnorm(bn, fan_in=300)
    z = np.repeat(np.arange(-300, 301, dtype=np.float32)[:, None], 37, axis=1)
    with torch.no_grad():
        t = torch.from_numpy(z)
        want = (bn(t) if kind == "1d" else bn(t.t().reshape(1, 37, 1, -1)).reshape(37, -1).t()).numpy()
    np.testing.assert_array_equal(K.affine(z, alpha, beta, rounding == "fma"), want)
    # the check has teeth: the other rounding differs from PyTorch on part of the range
    assert not np.array_equal(K.affine(z, alpha, beta, rounding != "fma"), want)


@pytest.mark.parametrize(("case", "events", "overrides"), [
    ("token-reversible-distill", False, dict(attention="token", reversible=True, distill_head=True)),
    ("channel-residual-onehead", False, dict(attention="channel", reversible=False, distill_head=False)),
    ("token-residual-distill-events", True, dict(attention="token", reversible=False, distill_head=True)),
    ("channel-reversible-onehead-events", True, dict(attention="channel", reversible=True, distill_head=False)),
    # multi-word rows: head width 144 (3 words), 100 tokens (2 words); tau 3 (the division rounds) and V_th 0.75
    ("token-wide-tau3", False, dict(attention="token", embed_dim=144, num_heads=1, depth=1, img_size=20,
                                    neuron_kwargs={"tau": 3.0, "v_threshold": 0.75})),
    ("channel-wide-no-decay-input", False, dict(attention="channel", embed_dim=144, num_heads=1, depth=1,
                                                img_size=20, neuron_kwargs={"decay_input": False, "tau": 2.5})),
    ("soft-reset-vreset", False, dict(neuron_kwargs={"reset": "soft", "v_reset": -0.25}, time_steps=4)),
    ("stem-widths", False, dict(stem_widths=(8, 8, 16, 32, 32))),  # not D/8..D: recorded in the file
])
def test_packed_spikes_equal_pytorch_at_every_layer(case, events, overrides):
    model = make_model(seed=len(case), events=events, **overrides)
    x = grid_input(model, 3, seed=7, events=events)
    rates = assert_same_spikes(model, packed(model), x)
    # the comparison is meaningful only if the layers fire (neither silent nor saturated)
    assert all(0.0 < r < 1.0 for r in rates.values()), rates


def test_a_model_run_at_fewer_steps_than_built_packs_those_steps(tmp_path):
    model = make_model(seed=5, time_steps=4)
    model.set_time_steps(2)  # static images at T=2: PyTorch uses lambda[:2]
    pm = PackedModel.load(export_packed(model, tmp_path / "t2.bst"))  # the file held lambda of T=4 before
    assert pm.time_steps == 2
    assert_same_spikes(model, pm, grid_input(model, 3, seed=7))


def test_a_file_without_stem_widths_reads_the_reference_widths():
    model = make_model(seed=6)
    data = fold_model(model)
    assert data.arch.pop("stem_widths") == [4, 8, 16, 32, 32]  # a file written before the field
    assert_same_spikes(model, PackedModel(data, threads=THREADS), grid_input(model, 3, seed=7))


def test_sr_lif_binarizes_table1_of_the_paper():
    """The attention neuron of the packed runtime on the paper's Table 1 (T=4, V_th=1, decay 0.5, no input
    scaling): Attn = [4,0,0,0] -> [1,1,0,0]; [1,5,0,0] -> [1,1,1,0]; [0,3,1,0] -> [0,1,1,0]."""
    table = [([4, 0, 0, 0], [1, 1, 0, 0]), ([1, 5, 0, 0], [1, 1, 1, 0]), ([0, 3, 1, 0], [0, 1, 1, 0])]
    d = 5
    q = np.zeros((4, 1, len(table), d), np.uint8)
    k = np.zeros((4, 1, len(table), d), np.uint8)
    for i, (counts, _) in enumerate(table):
        for t, c in enumerate(counts):
            q[t, 0, i, :] = 1
            k[t, 0, i, :c] = 1  # token i attends to itself with Q K^T = c
    attn_lif = K.lif_vector(2.0, 1.0, 0.0, soft=True, decay_input=False)
    out = np.zeros_like(q)
    trace = np.zeros((4, 1, 1, len(table), len(table)), np.uint8)
    K.attention_token(q, k, q, 1, np.ones((4, 1), np.float32), attn_lif, K.lif_vector(2, 1, 0, False, True), out,
                      True, trace, 0, 1)
    for i, (_, want) in enumerate(table):
        assert trace[:, 0, 0, i, i].tolist() == want


def test_binary_linear_is_the_integer_product():
    """popcount form vs an int64 matrix product, K and O not multiples of 64 / 4 (tails of every loop)."""
    rng = np.random.default_rng(0)
    t, rows, k, o = 2, 5, 100, 7
    s = rng.integers(0, 2, (t, rows, k)).astype(np.uint8)
    w = np.where(rng.random((o, k)) < 0.5, -1, 1).astype(np.int8)
    sw = np.zeros((t, rows, 2), np.uint64)
    K.pack_bytes(s, sw, 0, rows)
    words = np.packbits(np.pad(w > 0, ((0, 0), (0, 28))), axis=-1, bitorder="little").view("<u8").astype(np.uint64)
    out = np.empty((t, rows, o), np.float32)
    ones, zeros = np.ones(o, np.float32), np.zeros(o, np.float32)
    dummy_b, dummy_u = np.zeros((1, 1, 1), np.uint64), np.zeros((1, 1, 1), np.uint8)
    K.binary_linear(sw, K.block_weights(words), ones, zeros, True, K.OUT_FLOAT, K.lif_vector(2, 1, 0, False, True),
                    o, out, dummy_b, dummy_u, 0, rows)
    np.testing.assert_array_equal(out, s.astype(np.int64) @ w.T.astype(np.int64))


@njit
def _block_products(x, wb, out):
    for b in range(wb.shape[0]):
        K.and_popcount8(x, wb[b], out, K.LANES * b)


def test_vector_block_product_against_numpy():
    """The LLVM vector block product (8 lanes, every K from 0 to 40 words) and the block layout against numpy's
    bit counts, with all-ones words (64 per lane) and 13 outputs (a padded last block)."""
    rng = np.random.default_rng(3)
    for k in range(41):
        x = rng.integers(0, 2**64, k, dtype=np.uint64, endpoint=False)
        w = rng.integers(0, 2**64, (13, k), dtype=np.uint64, endpoint=False)
        if k:
            x[0], w[:, 0] = ~np.uint64(0), ~np.uint64(0)
        wb = K.block_weights(w)
        assert wb.shape == (2, k, 8) and (wb[1, :, 5:] == 0).all()
        out = np.full(16, -1, np.int32)
        _block_products(x, wb, out)
        want = np.unpackbits((x[None, :] & w).view(np.uint8).reshape(13, -1), axis=1).sum(1)
        np.testing.assert_array_equal(out[:13], want)
        assert (out[13:] == 0).all()


def test_binary_layers_use_the_vector_popcount_where_the_cpu_has_one():
    """Where the CPU has AVX-512 VPOPCNTDQ, the compiled binary layer counts 8 words per instruction (vpopcntq on
    a zmm register) instead of one scalar popcnt per word."""
    if "avx512_vpopcntdq" not in cpu_info().flags:
        pytest.skip("this CPU has no AVX-512 VPOPCNTDQ")
    asm = "\n".join(_block_products.inspect_asm().values())
    assert "vpopcntq" in asm and "zmm" in asm


def test_maxpool_and_im2col_match_numpy():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 2, (2, 1, 5, 6, 70)).astype(np.uint8)  # T, B, H, W, C (2 words per pixel)
    words = np.zeros((2, 30, 2), np.uint64)
    K.pack_bytes(s.reshape(2, 30, 70), words, 0, 30)
    words = words.reshape(2, 1, 5, 6, 2)
    pooled = np.zeros((2, 1, 3, 3, 2), np.uint64)
    K.maxpool3s2(words, pooled, 0, 2)
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(s[:, 0]).permute(0, 3, 1, 2).float(), 3, 2, 1)
    got = np.unpackbits(pooled.view(np.uint8), axis=-1, bitorder="little")[..., :70]
    np.testing.assert_array_equal(got[:, 0].transpose(0, 3, 1, 2), ref.numpy())
    cols = np.zeros((2, 30, 18), np.uint64)
    K.im2col3x3(words, cols, 0, 5)
    x_pad = np.pad(s[:, 0], ((0, 0), (1, 1), (1, 1), (0, 0)))
    for dy in range(3):
        for dx in range(3):
            got = np.unpackbits(cols[:, :, (3 * dy + dx) * 2:(3 * dy + dx) * 2 + 2].copy().view(np.uint8), axis=-1,
                                bitorder="little")[..., :70]
            np.testing.assert_array_equal(got, x_pad[:, dy:dy + 5, dx:dx + 6].reshape(2, 30, 70))


# ---------------------------------------------------------------------------------------------- real data
def _fit_heads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """A brief training: BatchNorm statistics from the data, then both heads fitted by ridge regression on the
    pooled spiking features of their stream (closed form; no autograd through the spiking network, which would
    not fit a CI budget). The random spiking features give 3-5x chance accuracy: a meaningful classifier whose
    decisions the runtime must reproduce, not a good one."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
        model.eval()
        feats = model.forward_features(x).double()
        onehot = torch.nn.functional.one_hot(y, model.num_classes).double() * 2 - 1
        for head, f in ((model.head, feats[:, 0]), (model.head_dist, feats[:, -1])):
            a = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
            sol = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=f.dtype), a.T @ onehot)
            head.weight.copy_(sol[:-1].T.float())
            head.bias.copy_(sol[-1].float())
        conv = model.patch_embed.proj.conv
        conv.weight.copy_(torch.round(conv.weight * 256) / 256)


def _real_data_check(model: torch.nn.Module, x_train, y_train, x_test, y_test, min_acc: float) -> None:
    _fit_heads(model, x_train, y_train)
    got = packed(model).predict(x_test.numpy(), batch_size=100)
    ref, _, (_, tol) = torch_reference(model, x_test, hooks=False)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    assert np.all(np.abs(got - ref) <= tol)
    acc = float((got.argmax(1) == y_test.numpy()).mean())
    assert acc >= min_acc, f"the fitted model reached only {acc:.1%}"


def test_real_digits_argmax_identical():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor((digits.images - 8) / 8, dtype=torch.float32).unsqueeze(1)  # 0..16 -> a 2^-3 grid
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, embed_dim=32, num_heads=2)
    _real_data_check(model, x[perm[:500]], y[perm[:500]], x[perm[1000:1300]], y[perm[1000:1300]], 0.3)


@pytest.mark.data
def test_real_mnist_argmax_identical(shared_data):
    from bestformer.data import build_datasets

    bundle = build_datasets("mnist", shared_data / "mnist", limit=300, val_fraction=0.0)

    def arrays(split):
        xs, ys = zip(*(split[i] for i in range(len(split))), strict=True)
        pixels = torch.round((torch.stack(xs) * bundle.std[0] + bundle.mean[0]) * 255)
        return (pixels - 32) / 64, torch.tensor(ys)  # the standard normalization's scale, on a 2^-6 grid

    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", embed_dim=32, num_heads=2, time_steps=2)
    _real_data_check(model, *arrays(bundle.train), *arrays(bundle.test), 0.35)


# ------------------------------------------------------------------------------------------------- file
@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_model(seed=5)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    return export_packed(tiny, tmp_path_factory.mktemp("packed") / "tiny.bst")


def test_file_round_trip(tiny, tiny_file):
    data, header = read_packed(tiny_file)
    folded = fold_model(tiny)
    assert set(data.tensors) == set(folded.tensors)
    for name, arr in folded.tensors.items():
        np.testing.assert_array_equal(data.tensors[name], arr, err_msg=name)
    assert data.arch == folded.arch and header["format_version"] == FORMAT_VERSION
    assert header["model_name"] == "bestformer_tiny" and header["bn"] in ("fma", "mul_add")
    # deterministic bytes
    assert encode_packed(folded, model_name="bestformer_tiny") == encode_packed(fold_model(tiny),
                                                                                model_name="bestformer_tiny")
    x = grid_input(tiny, 2).numpy()
    np.testing.assert_array_equal(PackedModel.load(tiny_file).predict(x), packed(tiny).predict(x))


def test_bits_are_packed_eight_per_byte(tiny):
    """A [O, K] 1-bit weight takes O * ceil(K/8) bytes, LSB first along the input channels."""
    data = fold_model(tiny)
    raw = encode_packed(data)
    header = json.loads(zlib.decompress(raw[16:16 + int.from_bytes(raw[12:16], "little")]))
    entry = next(e for e in header["tensors"] if e[0] == "b0.q.w")
    _, dtype, shape, offset = entry
    assert dtype == "bits" and shape == [32, 32]
    start = 16 + int.from_bytes(raw[12:16], "little") + offset
    first_row = np.frombuffer(raw[start:start + 4], np.uint8)
    want = data.tensors["b0.q.w"][0] > 0
    np.testing.assert_array_equal(np.unpackbits(first_row, bitorder="little").astype(bool), want)
    nxt = next(e for e in header["tensors"] if e[3] > offset)
    assert nxt[3] - offset == 32 * 4


def test_float16_file_is_smaller_and_close(tiny, tmp_path):
    """A float16 file is the float32 file with its float tensors rounded to float16, nothing else: bit-equal to
    the float32 runtime on those rounded tensors, and within 2 % of PyTorch's logit range."""
    path = export_packed(tiny, tmp_path / "half.bst", dtype="float16")
    full = export_packed(tiny, tmp_path / "full.bst")
    assert path.stat().st_size < full.stat().st_size
    x = grid_input(tiny, 16, seed=3)
    with torch.no_grad():
        ref = tiny(x).numpy()
    got = PackedModel.load(path, threads=THREADS).predict(x.numpy())
    data, _ = read_packed(full)
    data.tensors = {k: t if t.dtype == np.int8 else t.astype(np.float16).astype(np.float32)
                    for k, t in data.tensors.items()}
    np.testing.assert_array_equal(got, PackedModel(data, threads=THREADS).predict(x.numpy()))
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_size_of_bestformer_4_384_matches_the_paper(tmp_path):
    """Paper convention (Table 2): 1-bit weights at 1 bit, first conv and one head at 32 bits, BN folded away:
    1.18 MB. The file also carries what that count leaves out (two numbers per BatchNorm channel, the distillation
    head, lambda): within 5% in float16; float32 is exactly the paper's payload plus those at 4 bytes each."""
    model = bestformer.create_model("bestformer_4_384").eval()
    half = export_packed(model, tmp_path / "half.bst", dtype="float16").stat().st_size
    assert abs(half / 1.18e6 - 1) <= 0.05, half
    full = export_packed(model, tmp_path / "full.bst").stat().st_size
    one_bit = 9_275_904 // 8
    first_conv, head = 3 * 48 * 9, 384 * 10 + 10
    paper = one_bit + 4 * (first_conv + head)
    assert abs(paper / 1e6 - 1.18) < 0.005
    bn_channels = 48 + 96 + 192 + 384 + 384 + 4 * (4 * 384 + 1536 + 384)
    extra = 4 * (2 * bn_channels + head + 4 * 4 * 8)  # folded BN, distillation head, lambda * 0.125 [T, heads]
    raw = (tmp_path / "full.bst").read_bytes()
    overhead = 16 + int.from_bytes(raw[12:16], "little") + DIGEST_SIZE
    assert full == paper + extra + overhead


def test_the_default_neuron_of_a_tie_is_the_same_in_every_process():
    """Two parameter sets, one layer each: the header must not depend on the string hash seed of the process."""
    code = ("from bestformer.deploy.packfile import _compact_neurons; "
            "print(_compact_neurons({n: {'tau': t, 'v_threshold': 1.0} for n, t in "
            "[('b0.q', 2.0), ('b0.k', 3.0), ('b0.v', 4.0), ('b0.o', 3.0), ('b0.a', 2.0)]}))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outs) == 1 and next(iter(outs)).startswith("{'default': {'tau': 2.0")  # the first of the tied sets


# ------------------------------------------------------------------------------------------- bad files
def _with_header(raw: bytes, edit, text=lambda t: t) -> bytes:
    """``raw`` with its header changed by ``edit`` (on the dict), then ``text`` (on the JSON), the checksum repaired."""
    hlen = int.from_bytes(raw[12:16], "little")
    header = json.loads(zlib.decompress(raw[16:16 + hlen]))
    edit(header)
    z = zlib.compress(text(json.dumps(header)).encode())
    body = raw[:12] + len(z).to_bytes(4, "little") + z + raw[16 + hlen:-DIGEST_SIZE]
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:-100], "truncated or corrupt"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:200] + bytes([b[200] ^ 1]) + b[201:], "checksum"),
    (lambda b: b"GARBAGE!" + b[8:], "not a bestformer packed model"),
    (lambda b: b[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + b[12:], "newer bestformer"),
    (lambda b: _with_header(b, lambda h: h["arch"].update(embed_dim=64, stem_widths=[8, 16, 32, 64, 64])), "tensor"),
    (lambda b: _with_header(b, lambda h: h["arch"].update(embed_dim=64)), "stem_widths must be 5 integers"),
    (lambda b: _with_header(b, lambda h: h["arch"].update(stem_widths=[4, 8, 16, 32])), "stem_widths must be"),
    (lambda b: _with_header(b, lambda h: h["arch"].update(attention="ssa")), "attention"),
    (lambda b: _with_header(b, lambda h: h["neurons"]["default"].update(tau=0.5)), "tau"),
    (lambda b: _with_header(b, lambda h: h["tensors"][0].__setitem__(3, 10**9)), "past the end"),
    (lambda b: _with_header(b, lambda h: h["tensors"].pop()), "missing"),
    # JSON integers beyond a float, and beyond Python's int parsing limit: still one FileFormatError
    (lambda b: _with_header(b, lambda h: h["neurons"]["default"].update(tau="TAU"),
                            lambda t: t.replace('"TAU"', "1" + "0" * 400)), "invalid tau 1000000"),
    (lambda b: _with_header(b, lambda h: h.update(pad="PAD"), lambda t: t.replace('"PAD"', "1" * 5000)),
     "header is corrupt"),
])
def test_bad_files_raise_one_line_file_format_error(tiny_file, mutate, message):
    with pytest.raises(FileFormatError, match=message) as err:
        PackedModel.from_bytes(mutate(tiny_file.read_bytes()))
    assert "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        PackedModel.load(tmp_path / "nope.bst")
    with pytest.raises(FileFormatError, match="folder"):
        PackedModel.load(tmp_path)


def test_export_refuses_models_it_cannot_pack():
    with pytest.raises(ConfigError, match="weight_bits=1"):
        fold_model(bestformer.create_model("spikformer_tiny"))
    with pytest.raises(ConfigError, match="attention"):
        fold_model(bestformer.create_model("bestformer_tiny", attention="ssa"))


def test_input_errors(tiny_file):
    pm = PackedModel.load(tiny_file)
    for bad, message in ((np.zeros((2, 3, 12, 12)), "1x12x12"), (np.zeros((2, 12, 12)), r"\[B, C, H, W\]"),
                         (np.zeros((4, 2, 1, 12, 12)), "T=4"), (np.full((1, 1, 12, 12), np.nan), "non-finite")):
        with pytest.raises(InputError, match=message):
            pm.predict(bad)


def test_runtime_imports_without_torch(tiny_file):
    code = ("import sys, numpy as np; from bestformer.deploy import PackedModel; "
            f"m = PackedModel.load({str(tiny_file)!r}); print(m.predict(np.zeros((2, 1, 12, 12))).shape); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["(2,", "10)", "False"]


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_export_predict(tiny, tmp_path, capsys):
    ckpt = bestformer.save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    assert cli_main(["export", str(ckpt), "--format", "packed", "-o", str(tmp_path / "m.bst"), "--verify", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "argmax identical on 100%" in out
    x = grid_input(tiny, 5).numpy()
    with torch.no_grad():
        labels = tiny(torch.from_numpy(x)).argmax(1).numpy()
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", x=x, y=labels)
    assert cli_main(["predict", str(tmp_path / "m.bst"), str(tmp_path / "x.npy"), "--threads", "1"]) == 0
    assert "predictions: " + ", ".join(map(str, labels)) in capsys.readouterr().out
    assert cli_main(["predict", str(tmp_path / "m.bst"), str(tmp_path / "xy.npz"), "--output",
                     str(tmp_path / "p.npz")]) == 0
    assert "top-1 accuracy: 100.00% (5/5)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "p.npz")["predictions"], labels)
    assert cli_main(["predict", str(tmp_path / "m.bst"), str(tmp_path / "missing.npy")]) == 2
    assert "cannot read inputs" in capsys.readouterr().err


def test_cli_bench_prints_the_ratio_last(capsys, tmp_path, monkeypatch):
    threads = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    for key in threads:
        monkeypatch.delenv(key, raising=False)
    assert cli_main(["bench", "--model", "bestformer_tiny", "--batch-sizes", "2", "--repeats", "1", "--threads", "1",
                     "--plot", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json")]) == 0
    # the thread settings it makes for itself are put back (they leaked into the caller's later subprocesses)
    assert not any(key in os.environ for key in threads)
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["rows"][0]["argmax_agree"] == 1.0 and res["file_ratio"] > 5
    assert res["cpu"] == cpu_info().describe() and any(line.endswith(f"CPU: {res['cpu']}") for line in out)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    if find_compiler() is None:  # the C library is the third engine wherever a compiler exists
        assert out[-1].startswith("latency ratio (PyTorch / packed): batch 2:") and "c" not in res
        return
    assert out[-1].startswith("latency ratio (PyTorch / packed, PyTorch / C): batch 2:")
    assert res["rows"][0]["c_bit_equal_packed"] is True and res["rows"][0]["c_speedup"] > 0
    assert res["c"]["popcount_path"] in ("avx512-vpopcntdq", "avx2", "neon", "portable")
    assert cli_main(["bench", "--model", "bestformer_tiny", "--batch-sizes", "1", "--repeats", "1", "--threads", "1",
                     "--no-plot", "--no-memory", "--no-c"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("latency ratio (PyTorch / packed): batch 1:")
    assert cli_main(["bench", "--model", "bestformer_tiny", "--batch-sizes", "1", "--repeats", "1", "--threads", "1",
                     "--no-plot", "--no-memory", "--c-flags", "-O2 -DBF_FORCE_PORTABLE"]) == 0
    assert "C library (portable popcount, -O2 -DBF_FORCE_PORTABLE)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- NIR
TH = 1.0 + 2.0**-20  # a threshold no grid value reaches: NIR fires on v > th, our LIF on v >= th


def _dyadic(module: torch.nn.Module) -> torch.nn.Module:
    """Parameters on coarse binary grids (BN with eps=0, var=1): every value both libraries compute is exact."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eps = 0.0
                mod.running_var.fill_(1.0)
                mod.weight.copy_(torch.randint(1, 9, mod.weight.shape) / 8.0)
                mod.bias.copy_(torch.randint(-8, 9, mod.bias.shape) / 8.0)
                mod.running_mean.copy_(torch.randint(-8, 9, mod.running_mean.shape) / 8.0)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.copy_(torch.round(mod.weight * 16) / 16)
    return module.eval()


def _snntorch(graph, extra_nodes: bool = False) -> torch.nn.Module:
    """snnTorch's importer; ``extra_nodes`` adds the two NIR nodes it lacks (Threshold; SumPool2d with padding),
    implemented from NIR's definitions."""
    import nir

    nirtorch = pytest.importorskip("nirtorch")
    snn_import = pytest.importorskip("snntorch.import_nir")
    with contextlib.redirect_stdout(io.StringIO()):  # snnTorch prints its threshold rescaling
        if not extra_nodes:
            return snn_import.import_from_nir(graph)

        class Threshold(torch.nn.Module):
            def __init__(self, thr):
                super().__init__()
                self.register_buffer("thr", torch.from_numpy(np.asarray(thr, np.float32)))

            def forward(self, x):
                return (x > self.thr).to(x.dtype)

        class SumPool(torch.nn.Module):
            def __init__(self, node):
                super().__init__()
                self.k, self.s, self.p = (tuple(int(v) for v in a) for a in (node.kernel_size, node.stride,
                                                                             node.padding))

            def forward(self, x):
                return torch.nn.functional.avg_pool2d(x, self.k, self.s, self.p, divisor_override=1)

        def snn(n):
            return snn_import._nir_to_snntorch_module(n, init_hidden=True)

        node_map = {nir.Affine: snn, nir.Linear: snn, nir.Conv2d: snn, nir.LIF: snn,
                    nir.Threshold: lambda n: Threshold(n.threshold), nir.SumPool2d: SumPool}
        return nirtorch.nir_to_torch(graph, node_map)


def _run_steps(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    outs, state = [], None
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for t in range(x.shape[0]):
            out, state = net(x[t], state)
            outs.append(out)
    return torch.stack(outs)


def test_nir_spiking_cnn_runs_identically_in_snntorch(tmp_path):
    import nir

    from bestformer.deploy.nir_export import export_nir
    from bestformer.layers import ConvBN, TimeMaxPool2d

    torch.manual_seed(0)
    cnn = _dyadic(torch.nn.Sequential(ConvBN(2, 8, weight_bits=32), LIF(v_threshold=TH),
                                      ConvBN(8, 16, weight_bits=1), LIF(v_threshold=TH), TimeMaxPool2d(),
                                      ConvBN(16, 16, weight_bits=1), LIF(v_threshold=TH)))
    x = torch.randint(0, 33, (4, 3, 2, 12, 12)).float() / 16
    with torch.no_grad():
        ref = cnn(x)
    graph = nir.read(export_nir(cnn, tmp_path / "cnn.nir", input_shape=(2, 12, 12)))
    assert {type(n).__name__ for n in graph.nodes.values()} >= {"Conv2d", "LIF", "SumPool2d", "Threshold"}
    out = _run_steps(_snntorch(graph, extra_nodes=True), x)
    assert 0.05 < ref.mean() < 0.95
    assert torch.equal(out, ref)


def test_nir_residual_mlp_block_runs_identically_in_snntorch():
    from bestformer.deploy.nir_export import to_nir
    from bestformer.layers import ResidualBlock, SpikingMLP

    torch.manual_seed(1)

    def neuron(**kw):
        return LIF(v_threshold=TH, **kw)

    block = _dyadic(torch.nn.Sequential(ResidualBlock(SpikingMLP(16, 32, neuron), SpikingMLP(16, 32, neuron)),
                                        neuron()))
    x = torch.randint(-16, 17, (4, 6, 16)).float() / 8
    with torch.no_grad():
        ref = block(x)
    graph = to_nir(block, input_shape=(16,))
    sums = [dst for dst in graph.nodes if sum(1 for e in graph.edges if e[1] == dst) > 1]
    assert sums, "the residual additions must appear as nodes with several inputs"
    out = _run_steps(_snntorch(graph), x)
    assert 0.05 < ref.mean() < 0.95
    assert torch.equal(out, ref)


def test_nir_transformer_attention_is_refused_or_split(tmp_path):
    import nir

    from bestformer.deploy.nir_export import NIRUnsupported, export_nir

    model = _dyadic(bestformer.create_model("bestformer_tiny", embed_dim=32, num_heads=2))
    with pytest.raises(NIRUnsupported, match=r"Q K\^T") as err:
        export_nir(model, tmp_path / "m.nir")
    assert "\n" not in str(err.value)
    path = tmp_path / "sub.nir"
    assert cli_main(["export", "--format", "nir", "--subgraphs", "-o", str(path),
                     str(bestformer.save_checkpoint(model, tmp_path / "m.safetensors"))]) == 0
    graph = nir.read(path)
    parts = {name for name, node in graph.nodes.items() if isinstance(node, nir.NIRGraph)}
    assert parts == {"patch_embed", "blocks.0.mlp", "head", "head_dist"}
    assert not any(a in parts and b in parts for a, b in graph.edges)  # nothing connects them
    # the MLP sub-graph computes the model's MLP on each token
    mlp = model.blocks[0].mlp
    for neuron in (mlp.neuron1, mlp.neuron2):
        neuron.params = neuron.params._replace(v_threshold=TH)
    graph = nir.read(export_nir(model, path, subgraphs=True))
    x = torch.randint(-16, 17, (4, 5, 32)).float() / 8
    with torch.no_grad():
        ref = mlp(x)
    out = _run_steps(_snntorch(graph.nodes["blocks.0.mlp"]), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_nir_refuses_soft_reset():
    from bestformer.deploy.nir_export import NIRUnsupported, to_nir

    with pytest.raises(NIRUnsupported, match="soft-reset"):
        to_nir(torch.nn.Sequential(LIF(reset="soft")), input_shape=(4,))


def test_split_run_covers_every_row_once_and_keeps_small_layers_on_the_caller():
    """Chunks tile [0, n) exactly; a range too small to be worth a thread (fewer than 2 chunks of
    MIN_CHUNK_ROWS rows) runs on the calling thread."""
    import threading

    from bestformer.deploy.threads import MIN_CHUNK_ROWS, split_run

    for n in (0, 1, MIN_CHUNK_ROWS - 1, 2 * MIN_CHUNK_ROWS - 1, 2 * MIN_CHUNK_ROWS, 1000):
        for threads in (1, 2, 3):
            hits = np.zeros(n, np.int64)
            callers: set[int] = set()

            def fn(lo: int, hi: int, hits=hits, callers=callers) -> None:
                hits[lo:hi] += 1
                callers.add(threading.get_ident())

            split_run(fn, n, threads)
            assert (hits == 1).all()
            if n < 2 * MIN_CHUNK_ROWS or threads == 1:
                assert callers <= {threading.get_ident()}
            else:
                assert threading.get_ident() not in callers


def test_the_kernels_cache_is_keyed_on_every_kernel_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba keys a cached function on its own file: a kernel of ``layers.py`` inlining a helper of ``core.py``
    would run an older ``core.py`` after an update. Every kernel caches in one folder named after all the sources
    (numba's own setting is left as it was)."""
    import numba
    from numba.core.registry import CPUDispatcher

    from bestformer.deploy import kernels
    from bestformer.deploy.kernels import attention, core, layers

    dispatchers = [getattr(m, n) for m in (core, layers, attention) for n in vars(m)
                   if isinstance(getattr(m, n), CPUDispatcher)]
    folders = {Path(d._cache._cache_path).parent for d in dispatchers}
    assert len(dispatchers) >= 20 and len(folders) == 1
    assert next(iter(folders)).parent == Path(os.environ.get("NUMBA_CACHE_DIR") or kernels.cache_dir() / "numba")
    assert os.environ.get("NUMBA_CACHE_DIR", "") == numba.config.CACHE_DIR
    copy = tmp_path / "kernels"
    shutil.copytree(Path(kernels.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(kernels, "__file__", str(copy / "__init__.py"))
    before = kernels._kernel_cache()
    assert Path(before).name == next(iter(folders)).name  # the copy has the same sources: the same key
    (copy / "core.py").write_text((copy / "core.py").read_text() + "\n# changed\n")
    assert kernels._kernel_cache() != before
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "mine"))  # the user's NUMBA_CACHE_DIR holds it
    assert Path(kernels._kernel_cache()).parent == tmp_path / "mine"


def _predict_in_child(pm: PackedModel, x: np.ndarray, queue: object) -> None:
    queue.put(pm.predict(x))  # type: ignore[attr-defined]


def test_a_forked_child_runs_the_packed_model_its_parent_ran():
    """The runtime's thread pools are the process's: a child forked after the parent predicted on 2 threads
    inherited the pool without its threads and waited forever (multiprocessing, gunicorn --preload)."""
    import multiprocessing

    from bestformer.deploy import threads

    model = make_model(seed=2)
    pm = PackedModel(fold_model(model), threads=2)
    x = grid_input(model, 8, seed=3).numpy()
    want = pm.predict(x)
    assert (os.getpid(), 2) in threads._POOLS  # the parent's pool exists: the child inherits it
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_predict_in_child, args=(pm, x, queue))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, want)
    assert child.exitcode == 0
