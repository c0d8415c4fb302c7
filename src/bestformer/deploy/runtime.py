"""The bit-packed inference runtime: runs a packed model file with numpy and numba, without torch.

``PackedModel.load("model.bst").predict(images)`` returns the logits of the PyTorch model in eval mode:

- binary layers compute ``sum s w = 2 popcount(s AND w+) - popcount(s)`` on 64-bit words (exact integers);
- binary attention maps are popcounts of packed spike rows (token form: ``Q K^T`` and ``B_Attn V``; channel form:
  ``K^T V`` and ``Q B_KV``), binarized by the soft-reset LIF of Eq. 9;
- every neuron repeats PyTorch's float32 operations in the same order (see :mod:`bestformer.deploy.kernels`), so
  every spike equals the PyTorch model's;
- the first convolution (full precision) is computed in float64 and rounded once, the token/time mean and the
  heads in float64: the only differences from PyTorch are PyTorch's own float32 roundings of these layers.

Importing this module does not import torch (a test checks ``sys.modules``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileFormatError, InputError
from . import kernels as K
from .packfile import PackedModelData, decode_packed, read_packed, stem_widths
from .threads import split_run

_ATTENTIONS = ("token", "channel")
_BLOCK_NEURONS = ("in", "q", "k", "v", "attn", "out", "n1", "n2")
def _words(signs: np.ndarray) -> np.ndarray:
    """+-1 weights ``[..., K]`` -> uint64 words ``[..., ceil(K/64)]`` (bit set for +1)."""
    k = signs.shape[-1]
    pad = (-k) % 64
    bits = np.pad(signs > 0, [(0, 0)] * (signs.ndim - 1) + [(0, pad)])
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def _unpack(words: np.ndarray, n: int) -> np.ndarray:
    """uint64 words ``[..., W]`` -> uint8 bits ``[..., n]``."""
    as_bytes = np.ascontiguousarray(words).astype("<u8").view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, count=n, bitorder="little")


def expected_shapes(arch: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a packed model of ``arch`` holds: name -> (``"bits"`` or ``"float"``, shape)."""
    c_in, d, t_steps = arch["in_channels"], arch["embed_dim"], arch["time_steps"]
    hidden, heads, classes = arch["mlp_hidden"], arch["num_heads"], arch["num_classes"]
    widths = stem_widths(arch)
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "stem.conv.w": ("float", (widths[0], c_in, 3, 3)),
        "stem.conv.bn": ("float", (2, widths[0])),
    }
    for i in range(4):
        out[f"stem.{i}.w"] = ("bits", (widths[i + 1], 3, 3, widths[i]))
        out[f"stem.{i}.bn"] = ("float", (2, widths[i + 1]))
    for j in range(arch["depth"]):
        for name, n_out, n_in in (("q", d, d), ("k", d, d), ("v", d, d), ("o", d, d),
                                  ("fc1", hidden, d), ("fc2", d, hidden)):
            out[f"b{j}.{name}.w"] = ("bits", (n_out, n_in))
            out[f"b{j}.{name}.bn"] = ("float", (2, n_out))
        out[f"b{j}.scale"] = ("float", (t_steps, heads))
    for head in ("head", "head_dist") if arch["distill_head"] else ("head",):
        out[f"{head}.w"] = ("float", (classes, d))
        out[f"{head}.b"] = ("float", (classes,))
    return out


def neuron_names(arch: dict[str, Any]) -> list[str]:
    """Names of the spiking layers, in execution order."""
    return [f"stem.{i}" for i in range(4)] + [f"b{j}.{n}" for j in range(arch["depth"]) for n in _BLOCK_NEURONS]


def _is_int(v: Any, lo: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < 1 << 31


def _check_arch(arch: dict[str, Any], src: str) -> None:
    def bad(what: str) -> FileFormatError:
        return FileFormatError(f"packed model {src}: {what}")

    for key in ("in_channels", "img_size", "time_steps", "embed_dim", "depth", "num_heads", "mlp_hidden",
                "num_classes"):
        if not _is_int(arch.get(key)):
            raise bad(f"architecture field {key!r} must be an integer >= 1, got {arch.get(key)!r}")
    widths = arch.get("stem_widths")
    if widths is not None and not (isinstance(widths, list) and len(widths) == 5 and all(map(_is_int, widths))
                                   and widths[-1] == arch["embed_dim"]):
        raise bad(f"stem_widths must be 5 integers >= 1 ending with embed_dim, got {widths!r}")
    if (widths is None and arch["embed_dim"] % 8) or arch["embed_dim"] % arch["num_heads"]:
        raise bad(f"embed_dim {arch['embed_dim']} must be divisible by num_heads {arch['num_heads']} (and by 8 "
                  "without stem_widths)")
    if arch.get("attention") not in _ATTENTIONS:
        raise bad(f"attention {arch.get('attention')!r} is not one of {_ATTENTIONS}")
    for key in ("reversible", "distill_head"):
        if not isinstance(arch.get(key), bool):
            raise bad(f"architecture field {key!r} must be true or false")
    pools = arch.get("pool_stages")
    if not (isinstance(pools, list) and len(pools) == 4 and all(isinstance(p, bool) for p in pools)):
        raise bad(f"pool_stages must be a list of 4 booleans, got {pools!r}")


def _lif_constants(params: Any, name: str, src: str) -> np.ndarray:
    def bad(what: str) -> FileFormatError:
        return FileFormatError(f"packed model {src}: neuron {name!r} {what}")

    if not isinstance(params, dict):
        raise bad("is missing or not an object")
    nums = {}
    for key in ("tau", "v_threshold", "v_reset"):
        val = params.get(key)
        try:
            num = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else math.nan
        except OverflowError:  # a JSON integer beyond the float range
            num = math.nan
        if math.isnan(num):
            raise bad(f"has an invalid {key} {val!r:.40}")
        nums[key] = num
    if params.get("reset") not in ("hard", "soft") or not isinstance(params.get("decay_input"), bool):
        raise bad("needs reset 'hard'/'soft' and a boolean decay_input")
    tau, vth, vr = nums["tau"], nums["v_threshold"], nums["v_reset"]
    if max(abs(vth), abs(vr), tau if math.isfinite(tau) else 0.0) > float(np.finfo(np.float32).max):
        raise bad("has parameters beyond the float32 range")
    if not (tau > 1.0 and (math.isfinite(tau) or not params["decay_input"])):
        raise bad(f"has tau {tau!r}; expected > 1 (inf only without decay_input)")
    if not (math.isfinite(vth) and math.isfinite(vr) and vth > vr):
        raise bad(f"needs finite v_threshold > v_reset, got {vth!r} <= {vr!r}")
    return K.lif_vector(tau, vth, vr, params["reset"] == "soft", params["decay_input"])


class PackedModel:
    """A packed 1-bit model ready to run (:meth:`load` a ``.bst`` file, then :meth:`predict`).

    Attributes: ``arch`` (the architecture from the file), ``header`` (the whole file header), ``num_classes``,
    ``time_steps``, ``input_shape`` (``(C, H, W)``), ``nbytes`` (memory held by the weights), ``threads`` (CPU
    threads used by :meth:`predict`; default: all cores).
    """

    def __init__(self, data: PackedModelData, header: dict[str, Any] | None = None, source: str = "<memory>",
                 threads: int | None = None):
        arch = data.arch
        _check_arch(arch, source)
        if arch["depth"] > len(data.tensors):  # before building per-block tables for an absurd depth
            raise FileFormatError(f"packed model {source}: depth {arch['depth']} needs more tensors than the file's "
                                  f"{len(data.tensors)}")
        expected = expected_shapes(arch)
        have = {name: ("bits" if t.dtype == np.int8 else "float", tuple(t.shape)) for name, t in data.tensors.items()}
        for name, spec in expected.items():
            if name not in have:
                raise FileFormatError(f"packed model {source}: tensor {name!r} is missing")
            if have[name] != spec:
                raise FileFormatError(f"packed model {source}: tensor {name!r} is {have[name][0]} "
                                      f"{list(have[name][1])}, expected {spec[0]} {list(spec[1])}")
        extra = sorted(set(have) - set(expected))
        if extra:
            raise FileFormatError(f"packed model {source}: unexpected tensor {extra[0]!r}")
        if data.bn not in ("fma", "mul_add"):
            raise FileFormatError(f"packed model {source}: unknown BatchNorm evaluation {data.bn!r}")
        self.lif = {n: _lif_constants(data.neurons.get(n, data.neurons.get("default")), n, source)
                    for n in neuron_names(arch)}
        self.arch, self.header, self.source = arch, header or {}, source
        self.use_fma = data.bn == "fma"
        t = data.tensors
        self.w: dict[str, np.ndarray] = {}
        self.f: dict[str, np.ndarray] = {}
        for name, (kind, shape) in expected.items():
            if kind == "bits":
                arr = t[name]
                # conv weights [O, 3, 3, C] -> words [O, 9 * ceil(C/64)], matching the packed im2col; then in
                # blocks of 8 outputs [ceil(O/8), K, 8] for the vector block product
                words = _words(arr.reshape(shape[0], 9, shape[-1])).reshape(shape[0], -1) if len(shape) == 4 \
                    else _words(arr)
                self.w[name] = K.block_weights(words)
            else:
                self.f[name] = np.ascontiguousarray(t[name], dtype=np.float32)
        self.stem_conv = self.f["stem.conv.w"].reshape(stem_widths(arch)[0], -1).astype(np.float64)
        self.heads = [(self.f[f"{h}.w"].astype(np.float64), self.f[f"{h}.b"].astype(np.float64))
                      for h in (("head", "head_dist") if arch["distill_head"] else ("head",))]
        self._f0 = np.zeros((1, 1, 1), np.float32)
        self._b0 = np.zeros((1, 1, 1), np.uint64)
        self._u0 = np.zeros((1, 1, 1), np.uint8)
        self._m0 = np.zeros((1, 1, 1, 1, 1), np.uint8)
        self._no_lif = K.lif_vector(2.0, 1.0, 0.0, False, True)
        self.threads = max(1, int(threads or os.cpu_count() or 1))

    # ---------------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> PackedModel:
        """Read, validate and prepare a packed model file (any problem: one :class:`FileFormatError` line)."""
        data, header = read_packed(path)
        return cls(data, header, str(path), threads)

    @classmethod
    def from_bytes(cls, buf: bytes, source: str = "<bytes>", threads: int | None = None) -> PackedModel:
        data, header = decode_packed(buf, source)
        return cls(data, header, source, threads)

    @property
    def num_classes(self) -> int:
        return self.arch["num_classes"]

    @property
    def time_steps(self) -> int:
        return self.arch["time_steps"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        a = self.arch
        return a["in_channels"], a["img_size"], a["img_size"]

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights in memory (packed words and float tensors)."""
        return sum(a.nbytes for a in self.w.values()) + sum(a.nbytes for a in self.f.values()) + \
            self.stem_conv.nbytes + sum(w.nbytes + b.nbytes for w, b in self.heads)

    def __repr__(self) -> str:
        a = self.arch
        return (f"PackedModel({self.header.get('model_name', '?')}: D={a['embed_dim']}, depth={a['depth']}, "
                f"heads={a['num_heads']}, T={a['time_steps']}, attention={a['attention']}, "
                f"classes={a['num_classes']}, {self.nbytes / 1e6:.2f} MB in memory)")

    # ---------------------------------------------------------------------------------------------- input
    def check_input(self, x: Any) -> np.ndarray:
        """``[B, C, H, W]`` images or ``[T, B, C, H, W]`` event frames as float32; clear errors otherwise."""
        x = np.asarray(x)
        if x.ndim not in (4, 5):
            raise InputError(f"expected images [B, C, H, W] or event frames [T, B, C, H, W], got an array of "
                             f"shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InputError(f"input must be numeric, got dtype {x.dtype}")
        if x.ndim == 5 and x.shape[0] != self.time_steps:
            raise InputError(f"event input has T={x.shape[0]} frames but the model has time_steps={self.time_steps}")
        if x.shape[-3:] != self.input_shape:
            raise InputError(f"input is {x.shape[-3]}x{x.shape[-2]}x{x.shape[-1]} (C x H x W), the model expects "
                             f"{'x'.join(map(str, self.input_shape))}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InputError("input has non-finite values (NaN/inf)")
        return x

    # -------------------------------------------------------------------------------------------- forward
    def predict(self, x: Any, batch_size: int = 32) -> np.ndarray:
        """Logits ``[B, num_classes]`` (float32) of images ``[B, C, H, W]`` or event frames ``[T, B, C, H, W]``,
        computed ``batch_size`` samples at a time."""
        x = self.check_input(x)
        axis = 1 if x.ndim == 5 else 0
        n = x.shape[axis]
        if n == 0:
            return np.zeros((0, self.num_classes), np.float32)
        step = max(1, int(batch_size))
        parts = [self.run(np.take(x, range(i, min(i + step, n)), axis=axis))[0] for i in range(0, n, step)]
        return np.concatenate(parts)


    __call__ = predict  # pm(x), as a module is called

    def run(self, x: np.ndarray, trace: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One batch; returns ``(logits, spikes)`` where ``spikes`` (with ``trace``) maps each spiking layer's name
        to its spikes in the PyTorch model's layout (``uint8``), e.g. ``[T, B, C, H, W]`` in the stem."""
        x = self.check_input(x)
        spikes: dict[str, np.ndarray] = {}
        tokens = self._stem(x, spikes if trace else None)
        if self.arch["reversible"]:
            x0 = x1 = tokens
            for j in range(self.arch["depth"]):
                x0 = self._attention(j, x1, spikes if trace else None) + (x0 + x1) / np.float32(2)
                x1 = self._mlp(j, x0, spikes if trace else None) + (x1 + x0) / np.float32(2)
            streams = [x0, x1]
        else:
            h = tokens
            for j in range(self.arch["depth"]):
                h = h + self._attention(j, h, spikes if trace else None)
                h = h + self._mlp(j, h, spikes if trace else None)
            streams = [h]
        return self._head(streams), spikes

    def _stem(self, x: np.ndarray, trace: dict[str, np.ndarray] | None) -> np.ndarray:
        t_steps, arch = self.time_steps, self.arch
        static = x.ndim == 4
        frames = x if static else x.reshape(-1, *x.shape[2:])
        n, c, h, w = frames.shape
        # full-precision first convolution: im2col in float64, one rounding to float32
        xp = np.pad(frames.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        cols = np.stack([xp[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=2)
        cols = cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)
        y = (cols @ self.stem_conv.T).astype(np.float32)
        b = n if static else n // t_steps
        y = y.reshape(1 if static else t_steps, b * h * w, -1)
        bits = np.zeros((t_steps, b * h * w, (y.shape[-1] + 63) // 64), np.uint64)
        bn = self.f["stem.conv.bn"]
        split_run(K.affine_lif_pack, b * h * w, self.threads, y, bn[0], bn[1], True, self.use_fma, self.lif["stem.0"],
                  bits)
        bits = bits.reshape(t_steps, b, h, w, -1)
        widths = stem_widths(arch)
        for i in range(4):
            if trace is not None:
                trace[f"stem.{i}"] = _unpack(bits, widths[i]).transpose(0, 1, 4, 2, 3)
            if arch["pool_stages"][i]:
                pooled = np.zeros((t_steps, b, (h - 1) // 2 + 1, (w - 1) // 2 + 1, bits.shape[-1]), np.uint64)
                split_run(K.maxpool3s2, t_steps * b, self.threads, bits, pooled)
                bits, h, w = pooled, pooled.shape[2], pooled.shape[3]
            cols = np.zeros((t_steps, b * h * w, 9 * bits.shape[-1]), np.uint64)
            split_run(K.im2col3x3, b * h, self.threads, bits, cols)
            if i == 3:
                return self._linear(cols, f"stem.{i}", K.OUT_FLOAT, self._no_lif).reshape(t_steps, b, h * w, -1)
            bits = self._linear(cols, f"stem.{i}", K.OUT_BITS, self.lif[f"stem.{i + 1}"]).reshape(t_steps, b, h, w, -1)
        raise AssertionError("unreachable")

    def _linear(self, s: np.ndarray, name: str, mode: int, lif: np.ndarray, group: int = 0) -> np.ndarray:
        t_steps, rows, _ = s.shape
        n_out = self.f[f"{name}.bn"].shape[1]
        out_f = np.empty((t_steps, rows, n_out), np.float32) if mode == K.OUT_FLOAT else self._f0
        out_b = np.zeros((t_steps, rows, (n_out + 63) // 64), np.uint64) if mode == K.OUT_BITS else self._b0
        out_u = np.zeros((t_steps, rows, n_out), np.uint8) if mode == K.OUT_BYTES else self._u0
        split_run(K.binary_linear, rows, self.threads, s, self.w[f"{name}.w"], self.f[f"{name}.bn"][0],
                  self.f[f"{name}.bn"][1], self.use_fma, mode, lif, group or n_out, out_f, out_b, out_u)
        return {K.OUT_FLOAT: out_f, K.OUT_BITS: out_b, K.OUT_BYTES: out_u}[mode]

    def _lif(self, x: np.ndarray, name: str) -> np.ndarray:
        t_steps, b, n, d = x.shape
        out = np.zeros((t_steps, b * n, (d + 63) // 64), np.uint64)
        split_run(K.affine_lif_pack, b * n, self.threads, x.reshape(t_steps, b * n, d), self._f0[0, 0],
                  self._f0[0, 0], False, self.use_fma, self.lif[name], out)
        return out

    def _pack(self, s: np.ndarray) -> np.ndarray:
        t_steps, rows, c = s.shape
        out = np.zeros((t_steps, rows, (c + 63) // 64), np.uint64)
        split_run(K.pack_bytes, rows, self.threads, s, out)
        return out

    def _attention(self, j: int, x: np.ndarray, trace: dict[str, np.ndarray] | None) -> np.ndarray:
        t_steps, b, n, d = x.shape
        heads, channel = self.arch["num_heads"], self.arch["attention"] == "channel"
        s = self._lif(x, f"b{j}.in")
        q, k, v = (self._linear(s, f"b{j}.{p}", K.OUT_BYTES, self.lif[f"b{j}.{p}"]).reshape(t_steps, b, n, d)
                   for p in "qkv")
        out = np.zeros((t_steps, b, n, d), np.uint8)
        side = d // heads if channel else n
        attn_map = np.zeros((t_steps, b, heads, side, side), np.uint8) if trace is not None else self._m0
        split_run(K.attention_channel if channel else K.attention_token, b * heads, self.threads, q, k, v, heads,
                  self.f[f"b{j}.scale"], self.lif[f"b{j}.attn"], self.lif[f"b{j}.out"], out, trace is not None,
                  attn_map)
        if trace is not None:
            trace.update({f"b{j}.in": _unpack(s, d).reshape(t_steps, b, n, d), f"b{j}.q": q, f"b{j}.k": k,
                          f"b{j}.v": v, f"b{j}.attn": attn_map, f"b{j}.out": out})
        y = self._linear(self._pack(out.reshape(t_steps, b * n, d)), f"b{j}.o", K.OUT_FLOAT, self._no_lif)
        return y.reshape(t_steps, b, n, d)

    def _mlp(self, j: int, x: np.ndarray, trace: dict[str, np.ndarray] | None) -> np.ndarray:
        t_steps, b, n, d = x.shape
        s = self._lif(x, f"b{j}.n1")
        hid = self._linear(s, f"b{j}.fc1", K.OUT_BITS, self.lif[f"b{j}.n2"])
        if trace is not None:
            hidden = self.arch["mlp_hidden"]
            trace[f"b{j}.n1"] = _unpack(s, d).reshape(t_steps, b, n, d)
            trace[f"b{j}.n2"] = _unpack(hid, hidden).reshape(t_steps, b, n, hidden)
        return self._linear(hid, f"b{j}.fc2", K.OUT_FLOAT, self._no_lif).reshape(t_steps, b, n, d)

    def _head(self, streams: list[np.ndarray]) -> np.ndarray:
        feats = [s.astype(np.float64).mean(axis=(0, 2)) for s in streams]
        if len(self.heads) == 2:  # distillation head: eval output is the mean of both heads
            (w0, b0), (w1, b1) = self.heads
            logits = ((feats[0] @ w0.T + b0) + (feats[-1] @ w1.T + b1)) / 2
        else:
            w0, b0 = self.heads[0]
            logits = (sum(feats) / len(feats)) @ w0.T + b0
        with np.errstate(over="ignore"):  # weights beyond float32 give inf logits, as in PyTorch
            return logits.astype(np.float32)
