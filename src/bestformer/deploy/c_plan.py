"""The plan of the generated C library (:mod:`bestformer.deploy.c_export`): the shapes of one sample through the
model, the layout of the caller's arena (every intermediate, overlaid where lifetimes allow, plus one scratch set
per thread), and the statements of ``bestformer_predict``, one kernel call per layer with the shapes as literals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .packfile import stem_widths

ALIGN = 64  # arena regions start on cache lines (the API needs 8: uint64_t and double)


def cname(name: str) -> str:
    return "bf_" + name.replace(".", "_")


# ------------------------------------------------------------------------------------------------ the plan
def _words(n: int) -> int:
    return (n + 63) // 64


@dataclass
class Geometry:
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
    def of(cls, a: dict[str, Any], events: bool) -> Geometry:
        d, widths = a["embed_dim"], stem_widths(a)
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


class Arena:
    """Regions of the caller's arena: ``name -> (offset, bytes)``. :meth:`take` places a region at the end of
    everything so far, or at ``at`` (overlaying regions no longer live), and returns its end."""

    def __init__(self) -> None:
        self.size = 0
        self.regions: dict[str, tuple[int, int]] = {}

    def take(self, name: str, nbytes: int, at: int | None = None) -> int:
        start = -(-(self.size if at is None else at) // ALIGN) * ALIGN
        self.regions[name] = (start, nbytes)
        self.size = max(self.size, start + nbytes)
        return start + nbytes

    @property
    def nbytes(self) -> int:
        return -(-self.size // ALIGN) * ALIGN


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


#: the scratch vectors of one thread: (C type, name, member of ``bf_scratch_t``)
SCRATCH = (("float", "h", "h"), ("float", "v_mem", "v"), ("float", "v2", "v2"), ("unsigned char", "f", "f"),
            ("int", "z", "z"), ("int", "pc", "pc"), ("double", "acc", "acc"), ("float", "y", "y"),
            ("uint64_t", "patch", "patch"), ("uint64_t", "row", "row"))


def plan_arena(g: Geometry, threads: int) -> tuple[Arena, Arena]:
    """The arena: the token streams; then the stem's two ping-pong buffers of packed spikes, overlaid by the blocks'
    buffers (spikes, Q, the plain K / V, the keys and values in their lane layouts, the attention output; the MLP's
    hidden spikes overlay Q..O); then ``threads`` copies of the scratch of one row (membranes, counts, the 3x3
    patch), whose layout is the second arena returned."""
    ar = Arena()
    t, n, d, dh, heads = g.t, g.n_tok, g.d, g.dh, g.heads
    work = ar.take("x0", 4 * t * n * d)
    if g.rev:
        work = ar.take("x1", 4 * t * n * d)
    stem_words = max([t * g.img * g.img * _words(g.widths[0])]
                     + [t * s["h"] * s["w"] * s["kw"] for s in g.stages]
                     + [t * s["hp"] * s["wp"] * _words(s["n_out"]) for s in g.stages[:3]])
    ar.take("stem_b", 8 * stem_words, ar.take("stem_a", 8 * stem_words, work))
    blk = ar.take("s", 8 * t * n * _words(d), work)
    qkv = 8 * t * n * heads * _words(dh)
    end = ar.take("kp", qkv, ar.take("q", qkv, blk))  # kp: K, then V, as the linear layer writes them
    lanes = heads * t * _pad8(dh) * _words(n)  # channels as lanes
    end = ar.take("kb", 8 * (lanes if g.channel else heads * t * _pad8(n) * _words(dh)), end)
    end = ar.take("vt", 8 * lanes, end)
    if g.channel:
        end = ar.take("kv", 8 * t * _pad8(dh) * _words(dh), end)
    ar.take("o", 8 * t * n * _words(d), end)
    ar.take("hid", 8 * t * n * _words(g.hidden), blk)
    ar.take("feat", 8 * 2 * d)
    maxw = max([n, d, g.hidden, *g.widths])
    patch = max([9 * s["kw"] for s in g.stages] + [_words(n)])
    one = Arena()
    for (_ctype, name, _member), nbytes in zip(SCRATCH, (
            4 * maxw, 4 * maxw, 4 * maxw, maxw, 4 * t * _pad8(maxw), 4 * t, 8 * g.widths[0], 4 * g.widths[0],
            8 * t * patch, 8 * t * _words(n)), strict=True):
        one.take(name, nbytes)
    ar.take("scratch", threads * one.nbytes)
    return ar, one


def predict_body(g: Geometry, lif_index: dict[str, int]) -> list[str]:
    """The statements of ``bestformer_predict``: one call per layer, shapes as literals."""
    t, n, d, dh, heads = g.t, g.n_tok, g.d, g.dh, g.heads
    d_w, h_w = _words(d), _words(g.hidden)

    def lif(name: str) -> str:
        return f"&bf_lif[{lif_index[name]}]"

    def bn(name: str, c: int) -> str:
        return f"{cname(name + '.bn')}, {cname(name + '.bn')} + {c}"

    def linear(src: str, kw: int, name: str, n_out: int, mode: str, lif_name: str | None, group: int,
               out_b: str = "NULL", out_f: str = "NULL", other: str = "NULL") -> str:
        return (f"bf_linear({src}, {n}, {kw}, {cname(name + '.w')}, {bn(name, n_out)}, {n_out}, {mode}, "
                f"{lif(lif_name) if lif_name else 'NULL'}, {group}, {out_b}, {out_f}, {other}, s);")

    body = ["/* stem */",
            f"bf_stem_conv(input, {t if g.events else 1}, {g.c_in}, {g.img}, {g.img}, bf_stem_conv_w, "
            f"{bn('stem.conv', g.widths[0])}, {g.widths[0]}, {lif('stem.0')}, stem_a, s);"]
    cur, other = "stem_a", "stem_b"
    for i, st in enumerate(g.stages):
        if st["pool"]:
            body.append(f"bf_maxpool({cur}, {st['h']}, {st['w']}, {st['kw']}, {other});")
            cur, other = other, cur
        conv = (f"bf_conv3x3({cur}, {st['hp']}, {st['wp']}, {st['kw']}, {cname(f'stem.{i}.w')}, "
                f"{bn(f'stem.{i}', st['n_out'])}, {st['n_out']}, ")
        if i < 3:
            body.append(conv + f"BF_OUT_BITS, {lif(f'stem.{i + 1}')}, {other}, NULL, s);")
            cur, other = other, cur
        else:
            body.append(conv + "BF_OUT_FLOAT, NULL, NULL, x0, s); /* the tokens [T][N][D] */")
    if g.rev:
        body.append(f"memcpy(x1, x0, sizeof(float) * {t * n * d}u); /* X0 = X1 = the stem's tokens */")
    for j in range(g.depth):
        p = f"b{j}"
        body += [f"/* block {j}: attention ({'channel' if g.channel else 'token'} form) */",
                 f"bf_lif_stream({'x1' if g.rev else 'x0'}, {n}, {d}, {lif(p + '.in')}, sb, s);",
                 linear("sb", d_w, p + ".q", d, "BF_OUT_BITS", p + ".q", dh, out_b="qb"),
                 linear("sb", d_w, p + ".k", d, "BF_OUT_BITS", p + ".k", dh, out_b="kp"),
                 f"bf_transpose_heads(kp, {n}, {heads}, {dh}, kb); /* K^T rows: channels as lanes */" if g.channel
                 else f"bf_block_rows(kp, {n}, {heads}, {_words(dh)}, kb); /* the keys as lanes */",
                 linear("sb", d_w, p + ".v", d, "BF_OUT_BITS", p + ".v", dh, out_b="kp"),
                 f"bf_transpose_heads(kp, {n}, {heads}, {dh}, vt); /* V: channels as lanes */",
                 f"memset(ob, 0, sizeof(uint64_t) * {t * n * d_w}u);",
                 f"bf_attention_{'channel' if g.channel else 'token'}(qb, kb, vt, {n}, {heads}, {dh}, "
                 f"{cname(p + '.scale')}, {lif(p + '.attn')}, {lif(p + '.out')}, ob, {d_w}, "
                 f"{'kv, ' if g.channel else ''}s);"]
        if g.rev:
            body.append(linear("ob", d_w, p + ".o", d, "BF_OUT_REV", None, d, out_f="x0", other="x1")
                        + " /* X0 = Attn(X1) + (X0 + X1) / 2 */")
        else:
            body.append(linear("ob", d_w, p + ".o", d, "BF_OUT_RES", None, d, out_f="x0") + " /* h = h + Attn(h) */")
        body += [f"/* block {j}: MLP */",
                 f"bf_lif_stream(x0, {n}, {d}, {lif(p + '.n1')}, sb, s);",
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
