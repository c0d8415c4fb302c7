"""Deploy without Python: a self-contained C99 inference library generated from a packed 1-bit model.

``export_c(model_or_packed, out_dir)`` writes

- ``model.h``: the API, ``int bestformer_predict(const float *input, size_t input_len, float *logits,
  size_t logits_len, void *arena, size_t arena_bytes)`` (0, or a negative ``BESTFORMER_ERR_*`` code; every length
  checked first), ``bestformer_popcount_path()``, ``BESTFORMER_ARENA_BYTES`` / ``_ALIGN``, the input and output
  sizes;
- ``model.c``: the weights as ``static const`` arrays (1-bit signs packed 64 per ``uint64_t`` word in blocks of 8
  outputs, folded BatchNorm scale/bias, ``lambda * 0.125``, the first convolution, the heads, every LIF's
  constants, all floats as exact hexadecimal literals), the kernels (``c/*.c``: the popcount path is chosen at
  compile time among AVX-512 VPOPCNTDQ, AVX2, NEON and portable C) and the generated ``bestformer_predict``;
- ``example.c``: a command-line driver (raw float32 inputs -> one line of logits per input on stdout).

No ``malloc``: every intermediate lives in the caller's arena (its size is exact, computed here); libc only
(``string.h`` for ``memcpy``; no libm: ``fmaf`` is emulated exactly unless the compiler has a hardware FMA).
Build: ``cc -std=c99 -O2 -ffp-contract=off -c model.c``; a build that would fuse other float operations is refused
(``-ffast-math`` and x87 at compile time, contraction at run time: ``BESTFORMER_ERR_BUILD``).

The C code computes what the numba runtime (:mod:`bestformer.deploy.kernels`) computes, operation for operation
(see ``c/base.c``), so its spikes are those of the packed runtime and of PyTorch, and its logits equal the packed
runtime's bit for bit. The only operations whose rounding is not pinned down are the two the numba runtime
leaves to numpy/BLAS in float64 (the first convolution and the heads): both round a float64 sum once to float32,
so the two runtimes can differ only where float64 sums in different orders straddle a float32 rounding boundary
(a chance of order 2^-28 per value; never observed).

Covered: every model the packed runtime runs (token and channel attention, reversible and residual, one or two
heads, static images and event frames ``[T, C, H, W]``, any LIF parameters per layer, BatchNorm ``fma`` or
``mul_add``), one sample per call; with ``threads > 1`` and ``-fopenmp`` each layer's rows run on several threads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from .c_plan import SCRATCH, Geometry, cname, plan_arena, predict_body
from .packfile import PackedModelData

if TYPE_CHECKING:
    from .runtime import PackedModel

#: the flags the generated code is written for (``-ffp-contract=off``: only the explicit fma is fused)
CFLAGS = ("-std=c99", "-O2", "-ffp-contract=off")


@dataclass
class CExportInfo:
    """What :func:`export_c` wrote: ``files`` (name -> path), ``arena_bytes`` (the caller's buffer),
    ``input_size`` (floats per sample: ``C*H*W`` or ``T*C*H*W`` for event frames), ``num_classes``,
    ``weight_bytes`` (the constant arrays), ``events`` (event-frame input), ``arch`` and ``threads`` (the scratch
    sets in the arena)."""

    out_dir: Path
    files: dict[str, Path]
    arena_bytes: int
    input_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    weight_bytes: int
    events: bool
    arch: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    arena_layout: dict[str, tuple[int, int]] = field(default_factory=dict)


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


#: the kernels, in the order pasted into model.c: portability checks and fmaf, the popcount paths and the block
#: product, the layers, the attention, the heads
_RUNTIME = ("base.c", "popcount.c", "layers.c", "attention.c", "head.c")


def export_c(model_or_packed: Any, out_dir: str | Path, events: bool = False, threads: int = 1) -> CExportInfo:
    """Write the C library of a 1-bit model (a ``SpikingTransformer``, a :class:`PackedModel`, its
    :class:`PackedModelData` or a ``.bst`` path) to ``out_dir``; returns a :class:`CExportInfo`.

    ``events``: the library takes event frames ``[T][C][H][W]`` per sample (a model trained on an event dataset)
    instead of one static image ``[C][H][W]`` repeated over the ``T`` steps. ``threads``: the arena holds that many
    scratch sets, so that a build with OpenMP (``-fopenmp``) runs each layer's rows on up to ``threads`` threads
    (the results are the same bits for any thread count)."""
    if not isinstance(threads, int) or not 1 <= threads <= 256:
        raise ConfigError(f"threads must be an integer in 1..256, got {threads!r}")
    from .runtime import neuron_names

    pm = _packed(model_or_packed)
    a = pm.arch
    g = Geometry.of(a, events)
    ar, one = plan_arena(g, threads)
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
    for name in sorted(pm.f):  # the first convolution with its outputs innermost: [C][3][3][O]
        wr.floats(cname(name), pm.f[name].transpose(1, 2, 3, 0) if name == "stem.conv.w" else pm.f[name])
    for name in sorted(pm.w):
        wr.words(cname(name), pm.w[name])  # the runtime's blocks of 8 outputs [O/8][K][8]

    ptrs = [("float", "x0", "x0"), ("uint64_t", "stem_a", "stem_a"), ("uint64_t", "stem_b", "stem_b"),
            ("uint64_t", "s", "sb"), ("uint64_t", "q", "qb"), ("uint64_t", "kp", "kp"), ("uint64_t", "kb", "kb"),
            ("uint64_t", "vt", "vt"), ("uint64_t", "o", "ob"), ("uint64_t", "hid", "hb"), ("double", "feat", "feat")]
    ptrs += [("float", "x1", "x1")] if g.rev else []
    ptrs += [("uint64_t", "kv", "kv")] if g.channel else []
    input_size = math.prod(g.input_shape)
    template = "\n".join(_template(part) for part in _RUNTIME)
    # the name comes from the file's header (untrusted): kept to characters that cannot end a C comment
    model_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(pm.header.get("model_name") or
                                                     getattr(model_or_packed, "model_name", "") or "model"))[:100]
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
        f"#define BF_POOL {1 if any(st['pool'] for st in g.stages) else 0} /* a stem stage max-pools */",
        f"#define BF_THREADS {threads} /* scratch sets in the arena: the most OpenMP threads a call uses */",
        "#define BF_FLT_TRUE_MIN 0x1p-149f", "",
        template,
        "/* ---- weights and constants ---- */",
        "static const bf_lif_t bf_lif[%d] = {\n%s\n};\n" % (len(rows), "\n".join(rows)),  # noqa: UP031
        *wr.parts,
        "int bestformer_predict(const float *input, size_t input_len, float *logits, size_t logits_len, void *arena,",
        "                       size_t arena_bytes) {",
        "    bf_scratch_t s[BF_THREADS];",
        "    unsigned char *base = (unsigned char *)arena;",
        "    int c;",
        *(f"    {ctype} *{var};" for ctype, _r, var in ptrs),
        "    if (input == NULL || logits == NULL || arena == NULL) return BESTFORMER_ERR_NULL;",
        "    if (input_len != BESTFORMER_INPUT_SIZE || logits_len < BESTFORMER_NUM_CLASSES",
        "        || arena_bytes < BESTFORMER_ARENA_BYTES) return BESTFORMER_ERR_SIZE;",
        "#ifdef UINTPTR_MAX",
        "    if ((uintptr_t)arena % BESTFORMER_ARENA_ALIGN != 0) return BESTFORMER_ERR_ALIGN;",
        "#endif",
        f"    if (!bf_check_input(input, {input_size}u)) return BESTFORMER_ERR_INPUT;",
        "    if (bf_contracted()) return BESTFORMER_ERR_BUILD;",
        *(f"    {var} = ({ctype} *)(base + {ar.regions[r][0]}u);" for ctype, r, var in ptrs),
        f"    for (c = 0; c < BF_THREADS; c++) {{ /* one scratch set per thread, {one.nbytes} bytes each */",
        f"        unsigned char *sp = base + {ar.regions['scratch'][0]}u + (size_t)c * {one.nbytes}u;",
        *(f"        s[c].{member} = ({ctype} *)(sp + {one.regions[name][0]}u);" for ctype, name, member in SCRATCH),
        "    }",
        *("    " + line for line in predict_body(g, {n: i for i, n in enumerate(names)})),
        "    (void)stem_b; (void)sb; (void)qb; (void)kp; (void)kb; (void)vt; (void)ob; (void)hb;",
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
    for path in files.values():  # an export that fails half-way leaves files missing, never a mixed pair
        path.unlink(missing_ok=True)
    atomic_write_bytes(files["model.h"], header.encode())
    atomic_write_bytes(files["model.c"], "\n".join(source).encode())
    atomic_write_bytes(files["example.c"], _template("example.c").encode())
    return CExportInfo(out_dir=out, files=files, arena_bytes=ar.nbytes, input_size=input_size,
                       input_shape=g.input_shape, num_classes=g.classes, weight_bytes=wr.weight_bytes,
                       events=g.events, arch=dict(a), arena_layout=dict(ar.regions), threads=threads)
