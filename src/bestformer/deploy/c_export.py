"""Deploy without Python: a self-contained C99 inference library generated from a packed 1-bit model.

``export_c(model_or_packed, out_dir)`` writes

- ``model.h``: the API, ``int bestformer_predict(const float *input, float *logits, void *arena)`` (0, or a
  negative ``BESTFORMER_ERR_*`` code), ``BESTFORMER_ARENA_BYTES`` / ``_ALIGN``, the input and output sizes;
- ``model.c``: the weights as ``static const`` arrays (1-bit signs packed 64 per ``uint64_t`` word, folded
  BatchNorm scale/bias, ``lambda * 0.125``, the first convolution, the heads, every LIF's constants, all floats as
  exact hexadecimal literals), the layer kernels (``c/runtime.c``) and the generated ``bestformer_predict``;
- ``example.c``: a command-line driver (raw float32 input file -> logits on stdout).

No ``malloc``: every intermediate lives in the caller's arena (its size is exact, computed here); libc only
(``string.h`` for ``memcpy``; no libm: ``fmaf`` is emulated exactly unless the compiler has a hardware FMA).
Build: ``cc -std=c99 -O2 -ffp-contract=off -c model.c``; a build that would fuse other float operations is refused
(``-ffast-math`` and x87 at compile time, contraction at run time: ``BESTFORMER_ERR_BUILD``).

The C code computes what the numba runtime (:mod:`bestformer.deploy.kernels`) computes, operation for operation
(see ``c/runtime.c``), so its spikes are those of the packed runtime and of PyTorch, and its logits equal the
packed runtime's bit for bit. The only operations whose rounding is not pinned down are the two the numba runtime
leaves to numpy/BLAS in float64 (the first convolution and the heads): both round a float64 sum once to float32,
so the two runtimes can differ only where float64 sums in different orders straddle a float32 rounding boundary
(a chance of order 2^-28 per value; never observed).

Covered: every model the packed runtime runs (token and channel attention, reversible and residual, one or two
heads, static images and event frames ``[T, C, H, W]``, any LIF parameters per layer, BatchNorm ``fma`` or
``mul_add``), one sample per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from .packfile import PackedModelData

if TYPE_CHECKING:
    from .runtime import PackedModel

#: the flags the generated code is written for (``-ffp-contract=off``: only the explicit fma is fused)
CFLAGS = ("-std=c99", "-O2", "-ffp-contract=off")
_ALIGN = 64  # arena regions start on cache lines (the API needs 8: uint64_t and double)


@dataclass
class CExportInfo:
    """What :func:`export_c` wrote: ``files`` (name -> path), ``arena_bytes`` (the caller's buffer),
    ``input_size`` (floats per sample: ``C*H*W`` or ``T*C*H*W`` for event frames), ``num_classes``,
    ``weight_bytes`` (the constant arrays), ``events`` (event-frame input) and ``arch``."""

    out_dir: Path
    files: dict[str, Path]
    arena_bytes: int
    input_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    weight_bytes: int
    events: bool
    arch: dict[str, Any] = field(default_factory=dict)
    arena_layout: dict[str, tuple[int, int]] = field(default_factory=dict)

    def compile_command(self, output: str = "model.o", compiler: str = "cc") -> list[str]:
        return [compiler, *CFLAGS, "-c", str(self.files["model.c"]), "-o", output]


def _packed(model_or_packed: Any) -> PackedModel:
    from .runtime import PackedModel

    if isinstance(model_or_packed, PackedModel):
        return model_or_packed
    if isinstance(model_or_packed, PackedModelData):
        return PackedModel(model_or_packed, threads=1)
    if isinstance(model_or_packed, (str, Path)):
        return PackedModel.load(model_or_packed, threads=1)
    from .fold import fold_model  # a torch module

    return PackedModel(fold_model(model_or_packed), threads=1)


# ------------------------------------------------------------------------------------------------ literals
def _f32(x: float) -> str:
    x = float(np.float32(x))
    if not math.isfinite(x):
        raise ConfigError(f"cannot export the non-finite constant {x!r} to C")
    mantissa, exponent = float.hex(x).split("p")  # exact; trailing zeros of the mantissa dropped
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}f"


class _Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.weight_bytes = 0

    def words(self, name: str, arr: np.ndarray) -> None:
        flat = np.ascontiguousarray(arr, dtype=np.uint64).ravel()
        self.weight_bytes += flat.size * 8
        lines = [", ".join(f"0x{int(v):016x}ULL" for v in flat[i:i + 4]) for i in range(0, flat.size, 4)]
        self.parts.append(f"static const uint64_t {name}[{max(flat.size, 1)}] = {{\n    "
                          + ",\n    ".join(lines or ["0"]) + "\n};\n")

    def floats(self, name: str, arr: np.ndarray) -> None:
        flat = np.ascontiguousarray(arr, dtype=np.float32).ravel()
        self.weight_bytes += flat.size * 4
        lines = [", ".join(_f32(v) for v in flat[i:i + 6]) for i in range(0, flat.size, 6)]
        self.parts.append(f"static const float {name}[{max(flat.size, 1)}] = {{\n    "
                          + ",\n    ".join(lines or ["0"]) + "\n};\n")


def _template(name: str) -> str:
    """A file of ``bestformer/deploy/c/`` (package data): the kernels, the header (``str.format`` fields), the
    example driver."""
    return resources.files("bestformer.deploy").joinpath(f"c/{name}").read_text(encoding="utf-8")


def _cname(name: str) -> str:
    return "bf_" + name.replace(".", "_")


# ------------------------------------------------------------------------------------------------ the plan
def _words(n: int) -> int:
    return (n + 63) // 64


@dataclass
class _Geometry:
    """Shapes of one sample through the model (``*_w``: 64-bit words of a packed row)."""

    t: int
    c_in: int
    img: int
    d: int
    heads: int
    hidden: int
    classes: int
    depth: int
    channel: bool
    rev: bool
    distill: bool
    events: bool
    widths: list[int]
    stages: list[dict[str, Any]]
    n_tok: int

    @classmethod
    def of(cls, a: dict[str, Any], events: bool) -> _Geometry:
        d = a["embed_dim"]
        widths = [d // 8, d // 4, d // 2, d, d]
        stages = []
        h = w = a["img_size"]
        for i in range(4):
            pool = a["pool_stages"][i]
            hp, wp = ((h - 1) // 2 + 1, (w - 1) // 2 + 1) if pool else (h, w)
            stages.append(dict(h=h, w=w, pool=pool, hp=hp, wp=wp, kw=_words(widths[i]), n_out=widths[i + 1]))
            h, w = hp, wp
        return cls(a["time_steps"], a["in_channels"], a["img_size"], d, a["num_heads"], a["mlp_hidden"],
                   a["num_classes"], a["depth"], a["attention"] == "channel", a["reversible"], a["distill_head"],
                   bool(events), widths, stages, h * w)

    @property
    def dh(self) -> int:  # a head's width
        return self.d // self.heads

    @property
    def input_shape(self) -> tuple[int, ...]:
        chw = (self.c_in, self.img, self.img)
        return (self.t, *chw) if self.events else chw


class _Arena:
    """Regions of the caller's arena: ``name -> (offset, bytes)``. :meth:`take` places a region at the end of
    everything so far, or at ``at`` (overlaying regions no longer live), and returns its end."""

    def __init__(self) -> None:
        self.size = 0
        self.regions: dict[str, tuple[int, int]] = {}

    def take(self, name: str, nbytes: int, at: int | None = None) -> int:
        start = -(-(self.size if at is None else at) // _ALIGN) * _ALIGN
        self.regions[name] = (start, nbytes)
        self.size = max(self.size, start + nbytes)
        return start + nbytes

    @property
    def nbytes(self) -> int:
        return -(-self.size // _ALIGN) * _ALIGN


def _plan(g: _Geometry) -> _Arena:
    """The token streams; then the stem's two ping-pong buffers of packed spikes, overlaid by the blocks' buffers
    (spikes, Q, K, V, the attention output; the MLP's hidden spikes overlay Q..O); then the vector scratch."""
    ar = _Arena()
    t, n, d, dh = g.t, g.n_tok, g.d, g.dh
    work = ar.take("x0", 4 * t * n * d)
    if g.rev:
        work = ar.take("x1", 4 * t * n * d)
    stem_words = max([t * g.img * g.img * _words(g.widths[0])]
                     + [t * s["h"] * s["w"] * s["kw"] for s in g.stages]
                     + [t * s["hp"] * s["wp"] * _words(s["n_out"]) for s in g.stages[:3]])
    ar.take("stem_b", 8 * stem_words, ar.take("stem_a", 8 * stem_words, work))
    blk = ar.take("s", 8 * t * n * _words(d), work)
    end = ar.take("q", 8 * t * n * g.heads * _words(dh), blk)
    end = ar.take("k", 8 * (g.heads * t * dh * _words(n) if g.channel else t * n * g.heads * _words(dh)), end)
    end = ar.take("v", 8 * g.heads * t * dh * _words(n), end)
    ar.take("o", 8 * t * n * _words(d), end)
    ar.take("hid", 8 * t * n * _words(g.hidden), blk)
    maxw = max([n, d, g.hidden, *g.widths])
    for name, nbytes in (("h", 4 * maxw), ("v_mem", 4 * maxw), ("v2", 4 * maxw), ("f", maxw + 64),
                         ("z", 4 * t * maxw), ("pc", 4 * t), ("y", 4 * g.widths[0]), ("row", 8 * t * _words(n)),
                         ("kv", 8 * t * dh * _words(dh)), ("feat", 8 * 2 * d)):
        ar.take(name, nbytes)
    return ar


def _body(g: _Geometry, lif_index: dict[str, int]) -> list[str]:
    """The statements of ``bestformer_predict``: one call per layer, shapes as literals."""
    t, n, d, dh, heads = g.t, g.n_tok, g.d, g.dh, g.heads
    d_w, h_w, nw = _words(d), _words(g.hidden), _words(n)

    def lif(name: str) -> str:
        return f"&bf_lif[{lif_index[name]}]"

    def bn(name: str, c: int) -> str:
        return f"{_cname(name + '.bn')}, {_cname(name + '.bn')} + {c}"

    def linear(src: str, kw: int, name: str, n_out: int, mode: str, lif_name: str | None, group: int,
               out_b: str = "NULL", out_f: str = "NULL", other: str = "NULL") -> str:
        return (f"bf_linear({src}, {n}, {kw}, {_cname(name + '.w')}, {bn(name, n_out)}, {n_out}, {mode}, "
                f"{lif(lif_name) if lif_name else 'NULL'}, {group}, {out_b}, {out_f}, {other}, &s);")

    body = ["/* stem */",
            f"bf_stem_conv(input, {t if g.events else 1}, {g.c_in}, {g.img}, {g.img}, bf_stem_conv_w, "
            f"{bn('stem.conv', g.widths[0])}, {g.widths[0]}, {lif('stem.0')}, stem_a, &s);"]
    cur, other = "stem_a", "stem_b"
    for i, st in enumerate(g.stages):
        if st["pool"]:
            body.append(f"bf_maxpool({cur}, {st['h']}, {st['w']}, {st['kw']}, {other});")
            cur, other = other, cur
        conv = (f"bf_conv3x3({cur}, {st['hp']}, {st['wp']}, {st['kw']}, {_cname(f'stem.{i}.w')}, "
                f"{bn(f'stem.{i}', st['n_out'])}, {st['n_out']}, ")
        if i < 3:
            body.append(conv + f"BF_OUT_BITS, {lif(f'stem.{i + 1}')}, {other}, NULL, &s);")
            cur, other = other, cur
        else:
            body.append(conv + "BF_OUT_FLOAT, NULL, NULL, x0, &s); /* the tokens [T][N][D] */")
    if g.rev:
        body.append(f"memcpy(x1, x0, sizeof(float) * {t * n * d}u); /* X0 = X1 = the stem's tokens */")
    for j in range(g.depth):
        p = f"b{j}"
        vt_words = heads * t * dh * nw
        body += [f"/* block {j}: attention ({'channel' if g.channel else 'token'} form) */",
                 f"bf_lif_stream({'x1' if g.rev else 'x0'}, {n}, {d}, {lif(p + '.in')}, sb, &s);",
                 linear("sb", d_w, p + ".q", d, "BF_OUT_BITS", p + ".q", dh, out_b="qb")]
        if g.channel:  # K by channels (bits over tokens), like V
            body += [f"memset(kb, 0, sizeof(uint64_t) * {vt_words}u);",
                     linear("sb", d_w, p + ".k", d, "BF_OUT_BITS_T", p + ".k", dh, out_b="kb")]
        else:
            body.append(linear("sb", d_w, p + ".k", d, "BF_OUT_BITS", p + ".k", dh, out_b="kb"))
        body += [f"memset(vb, 0, sizeof(uint64_t) * {vt_words}u);",
                 linear("sb", d_w, p + ".v", d, "BF_OUT_BITS_T", p + ".v", dh, out_b="vb"),
                 f"memset(ob, 0, sizeof(uint64_t) * {t * n * d_w}u);",
                 f"bf_attention_{'channel' if g.channel else 'token'}(qb, kb, vb, {n}, {heads}, {dh}, "
                 f"{_cname(p + '.scale')}, {lif(p + '.attn')}, {lif(p + '.out')}, ob, {d_w}, &s);"]
        if g.rev:
            body.append(linear("ob", d_w, p + ".o", d, "BF_OUT_REV", None, d, out_f="x0", other="x1")
                        + " /* X0 = Attn(X1) + (X0 + X1) / 2 */")
        else:
            body.append(linear("ob", d_w, p + ".o", d, "BF_OUT_RES", None, d, out_f="x0") + " /* h = h + Attn(h) */")
        body += [f"/* block {j}: MLP */",
                 f"bf_lif_stream(x0, {n}, {d}, {lif(p + '.n1')}, sb, &s);",
                 linear("sb", d_w, p + ".fc1", g.hidden, "BF_OUT_BITS", p + ".n2", g.hidden, out_b="hb")]
        if g.rev:
            body.append(linear("hb", h_w, p + ".fc2", d, "BF_OUT_REV", None, d, out_f="x1", other="x0")
                        + " /* X1 = MLP(X0) + (X1 + X0) / 2 */")
        else:
            body.append(linear("hb", h_w, p + ".fc2", d, "BF_OUT_RES", None, d, out_f="x0") + " /* h = h + MLP(h) */")
    body += ["/* heads: the time/token mean and the linear heads in double, one rounding to float */",
             f"bf_mean_tokens(x0, {n}, {d}, feat);"]
    if g.rev:
        body.append(f"bf_mean_tokens(x1, {n}, {d}, feat + {d});")
    if g.distill:  # eval output: the mean of both heads (the first on X0, the second on the last stream)
        second = f"feat + {d}" if g.rev else "feat"
        body += [f"for (c = 0; c < {g.classes}; c++)",
                 f"    logits[c] = (float)((bf_head_logit(feat, bf_head_w, bf_head_b, {d}, c) + "
                 f"bf_head_logit({second}, bf_head_dist_w, bf_head_dist_b, {d}, c)) / 2.0);"]
    else:
        if g.rev:  # one head on the mean of both streams' features: sum(feats) / 2 in the numba runtime
            body.append(f"for (c = 0; c < {d}; c++) feat[c] = ((0.0 + feat[c]) + feat[{d} + c]) / 2.0;")
        body += [f"for (c = 0; c < {g.classes}; c++)",
                 f"    logits[c] = (float)bf_head_logit(feat, bf_head_w, bf_head_b, {d}, c);"]
    return body


def export_c(model_or_packed: Any, out_dir: str | Path, events: bool = False) -> CExportInfo:
    """Write the C library of a 1-bit model (a ``SpikingTransformer``, a :class:`PackedModel`, its
    :class:`PackedModelData` or a ``.bst`` path) to ``out_dir``; returns a :class:`CExportInfo`.

    ``events``: the library takes event frames ``[T][C][H][W]`` per sample (a model trained on an event dataset)
    instead of one static image ``[C][H][W]`` repeated over the ``T`` steps."""
    from .runtime import neuron_names

    pm = _packed(model_or_packed)
    a = pm.arch
    g = _Geometry.of(a, events)
    ar = _plan(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    wr = _Writer()
    names = neuron_names(a)
    rows = []
    for name in names:
        tau, beta, vth, vr, soft, decay, inv_tau, pow2 = (float(x) for x in pm.lif[name])
        tau = tau if math.isfinite(tau) else 0.0  # read only with decay_input, which needs a finite tau
        rows.append(f"    {{{_f32(tau)}, {_f32(beta)}, {_f32(vth)}, {_f32(vr)}, {_f32(inv_tau)}, {int(soft)}, "
                    f"{int(decay)}, {int(pow2)}}}, /* {name} */")
    wr.weight_bytes += len(rows) * 32
    for name in sorted(pm.f):
        wr.floats(_cname(name), pm.f[name])
    for name in sorted(pm.w):
        wr.words(_cname(name), pm.w[name])

    ptrs = [("float", "x0", "x0"), ("uint64_t", "stem_a", "stem_a"), ("uint64_t", "stem_b", "stem_b"),
            ("uint64_t", "s", "sb"), ("uint64_t", "q", "qb"), ("uint64_t", "k", "kb"), ("uint64_t", "v", "vb"),
            ("uint64_t", "o", "ob"), ("uint64_t", "hid", "hb"), ("double", "feat", "feat"),
            ("float", "h", "s.h"), ("float", "v_mem", "s.v"), ("float", "v2", "s.v2"),
            ("unsigned char", "f", "s.f"), ("int", "z", "s.z"), ("int", "pc", "s.pc"), ("float", "y", "s.y"),
            ("uint64_t", "row", "s.row"), ("uint64_t", "kv", "s.kv")] + ([("float", "x1", "x1")] if g.rev else [])
    input_size = math.prod(g.input_shape)
    template = _template("runtime.c")
    model_name = pm.header.get("model_name") or getattr(model_or_packed, "model_name", "") or "model"
    summary = (f"T={g.t}, input {'x'.join(map(str, g.input_shape))}{' event frames' if g.events else ''}, D={g.d}, "
               f"depth={g.depth}, heads={g.heads}, {a['attention']} attention, "
               f"{'reversible' if g.rev else 'residual'}, {'two heads' if g.distill else 'one head'}, "
               f"{g.classes} classes")
    header = _template("model.h").format(name=model_name, summary=summary, arena=ar.nbytes, input_size=input_size,
                            input_t=g.t if g.events else 1, c=g.c_in, hw=g.img, t=g.t, classes=g.classes,
                            layout="event frames [T][C][H][W]" if g.events else "an image [C][H][W]")
    source = [
        f"/* {model_name}: generated by bestformer.deploy.c_export (do not edit); {summary}. See model.h. */",
        "#include <float.h>", "#include <limits.h>", "#include <stddef.h>", "#include <stdint.h>",
        "#include <string.h>",
        '#include "model.h"', "",
        f"#define BF_T {g.t}",
        f"#define BF_BN_FMA {1 if pm.use_fma else 0} /* the folded BatchNorm's rounding recorded in the file */",
        f"#define BF_ATTENTION_CHANNEL {1 if g.channel else 0}",
        "#define BF_FLT_TRUE_MIN 0x1p-149f", "",
        template,
        "/* ---- weights and constants ---- */",
        "static const bf_lif_t bf_lif[%d] = {\n%s\n};\n" % (len(rows), "\n".join(rows)),  # noqa: UP031
        *wr.parts,
        "int bestformer_predict(const float *input, float *logits, void *arena) {",
        "    bf_scratch_t s;",
        "    unsigned char *base = (unsigned char *)arena;",
        "    int c;",
        *(f"    {ctype} *{var};" for ctype, _r, var in ptrs if not var.startswith("s.")),
        "    if (input == NULL || logits == NULL || arena == NULL) return BESTFORMER_ERR_NULL;",
        "#ifdef UINTPTR_MAX",
        "    if ((uintptr_t)arena % BESTFORMER_ARENA_ALIGN != 0) return BESTFORMER_ERR_ALIGN;",
        "#endif",
        f"    if (!bf_check_input(input, {input_size}u)) return BESTFORMER_ERR_INPUT;",
        "    if (bf_contracted()) return BESTFORMER_ERR_BUILD;",
        *(f"    {var} = ({ctype} *)(base + {ar.regions[r][0]}u);" for ctype, r, var in ptrs),
        *("    " + line for line in _body(g, {n: i for i, n in enumerate(names)})),
        "    (void)stem_b; (void)sb; (void)qb; (void)kb; (void)vb; (void)ob; (void)hb;",
        "    return BESTFORMER_OK;",
        "}", "",
        "#ifdef BESTFORMER_TEST_HOOKS /* for tests/test_c_export.py: the fmaf in use, or its emulation */",
        "void bestformer_test_fmaf(const float *a, const float *b, const float *c, float *out, int n, int soft);",
        "void bestformer_test_fmaf(const float *a, const float *b, const float *c, float *out, int n, int soft) {",
        "    int i;",
        "    for (i = 0; i < n; i++) out[i] = soft ? bf_fmaf_soft(a[i], b[i], c[i]) : bf_fmaf(a[i], b[i], c[i]);",
        "}",
        "#endif", "",
    ]
    files = {"model.h": out / "model.h", "model.c": out / "model.c", "example.c": out / "example.c"}
    atomic_write_bytes(files["model.h"], header.encode())
    atomic_write_bytes(files["model.c"], "\n".join(source).encode())
    atomic_write_bytes(files["example.c"], _template("example.c").encode())
    return CExportInfo(out_dir=out, files=files, arena_bytes=ar.nbytes, input_size=input_size,
                       input_shape=g.input_shape, num_classes=g.classes, weight_bytes=wr.weight_bytes,
                       events=g.events, arch=dict(a), arena_layout=dict(ar.regions))
