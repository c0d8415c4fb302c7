"""Side-by-side benchmark of the packed runtime and the generated C library against the same model in PyTorch
float32 eval mode (``bestformer bench``, ``benchmarks/deploy.py``).

Everything runs in one process, interleaved (PyTorch, packed, C, PyTorch, ...), so all see the same machine load;
each timed run follows an untimed run of the same engine; each latency is the median of its repeats. Peak memory
is the model's bytes plus the rise of the process's peak resident set during one inference (Linux
``/proc/self/status`` ``VmHWM``, reset through ``/proc/self/clear_refs`` before each measurement). File sizes: the
packed ``.bst`` file against the float32 checkpoint (safetensors). Micro-benchmarks measure this CPU's AND+popcount
throughput (the numba runtime's and the C library's block product) and its float32 GEMM throughput, which bound
what the bitwise engines can gain: 64 binary multiply-accumulates per popcount word against one per float32 FMA
lane.

Peak memory: before each measurement freed heap memory is handed back to the OS (glibc ``malloc_trim``) and the
peak counter reset, so that the rise of ``VmHWM`` is the memory the inference touches (activations, workspaces).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit

from ..analysis.report import save_png
from ..errors import ConfigError
from ..hardware import cpu_info
from ..progress import progress_bar
from ..training import save_checkpoint
from . import kernels as K
from .c_build import SPEED_FLAGS, CLibrary, compile_library, find_compiler, popcount_words_per_second
from .c_export import export_c
from .fold import export_packed
from .runtime import PackedModel
from .threads import split_run


@njit(nogil=True, cache=True)
def _popcount_loop(a, wb, reps, out, lo, hi):  # pragma: no cover - compiled
    """``reps`` passes of the binary layers' block product (:func:`~.kernels.and_popcount8`) of the rows
    ``a[lo:hi]`` against the weight blocks ``wb`` (L1-resident)."""
    for _ in range(reps):
        for i in range(lo, hi):
            for b in range(wb.shape[0]):
                K.and_popcount8(a[i], wb[b], out[i], K.LANES * b)


def popcount_throughput(threads: int, seconds: float = 0.5) -> float:
    """Words per second of ``popcount(a AND w)`` accumulated on ``threads`` threads (64 binary MACs per word), as
    the packed runtime's binary layers compute it (blocks of 8 outputs)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, (256, 16), dtype=np.uint64)
    wb = K.block_weights(rng.integers(0, 2**63, (16, 16), dtype=np.uint64))
    out = np.zeros((a.shape[0], 16), np.int32)
    reps, best = 512, 0.0  # ~30 ms per pass: the thread pool's start costs nothing
    split_run(_popcount_loop, a.shape[0], threads, a, wb, 1, out)  # compile
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        dt = _elapsed(lambda: split_run(_popcount_loop, a.shape[0], threads, a, wb, reps, out))
        best = max(best, reps * a.size * 16 / dt)
    return best


def sgemm_throughput(threads: int, seconds: float = 0.5, n: int = 384) -> float:
    """float32 multiply-accumulates per second of PyTorch's matrix product (its BLAS) on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, n**3 / (time.perf_counter() - t0))
    return best


def _hwm_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so that the next allocations show in the resident set."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure without trimming
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def inference_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Rise of the peak resident set while ``fn()`` runs (``None`` where Linux's peak reset is unavailable)."""
    gc.collect()
    _trim()
    if not _hwm_supported():
        return None
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def _elapsed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _bench_batch(model: torch.nn.Module, packed: PackedModel, clib: CLibrary | None, x: np.ndarray, repeats: int,
                 budget: float | None, model_bytes: dict[str, int] | None) -> dict[str, Any]:
    """Interleaved timings of one batch, the logit agreement and (with ``model_bytes``) the peak memory."""
    b = x.shape[0]
    xt = torch.from_numpy(x)

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return model(xt).numpy()

    engines: dict[str, Callable[[], np.ndarray]] = {"torch": run_torch,
                                                     "packed": lambda: packed.predict(x, batch_size=b)}
    if clib is not None:
        engines["c"] = lambda: clib.predict(x)
    outs = {name: fn() for name, fn in engines.items()}  # warm-up (the first packed call compiles the kernels)
    times: dict[str, list[float]] = {name: [] for name in engines}
    stop = time.perf_counter() + budget if budget else None
    while True:
        for name, fn in engines.items():  # an untimed run first: no engine is timed on what another left behind
            fn()  # (caches, sleeping thread pools: measured 2x on the C library's OpenMP threads after numba's)
            times[name].append(_elapsed(fn))
        n = len(times["torch"])
        if (stop is None and n >= repeats) or (stop is not None and n >= 2 and time.perf_counter() > stop):
            break
    ref, got = outs["torch"], outs["packed"]
    row: dict[str, Any] = {"batch": b, "runs": len(times["torch"]),
                           "max_abs_logit_diff": float(np.abs(got - ref).max()),
                           "argmax_agree": float((got.argmax(1) == ref.argmax(1)).mean())}
    for name in engines:
        row[f"{name}_s"] = statistics.median(times[name])
    row["speedup"] = row["torch_s"] / row["packed_s"]
    if clib is not None:
        row["c_speedup"] = row["torch_s"] / row["c_s"]
        row["c_bit_equal_packed"] = bool((outs["c"].view(np.uint32) == got.view(np.uint32)).all())
    if model_bytes is not None:
        peaks = {name: inference_peak_bytes(fn) for name, fn in engines.items()}
        if all(p is not None for p in peaks.values()):
            row["torch_peak_bytes"] = model_bytes["float32"] + peaks["torch"]
            row["packed_peak_bytes"] = model_bytes["packed"] + peaks["packed"]
            row["memory_ratio"] = row["torch_peak_bytes"] / row["packed_peak_bytes"]
            if clib is not None:  # the weights in the shared object, its arena, anything the call touched besides
                row["c_peak_bytes"] = model_bytes["c"] + peaks["c"]
    return row


def run_benchmark(model_name: str = "bestformer_4_384", checkpoint: str | None = None,
                  batch_sizes: Sequence[int] = (1, 32), threads: int = 2, repeats: int = 5,
                  budget: float | None = None, memory: bool = True, seed: int = 0,
                  progress: bool = True, c_engine: bool = True, c_flags: Sequence[str] = SPEED_FLAGS
                  ) -> dict[str, Any]:
    """Measure the packed runtime and (``c_engine``, where a C compiler exists) the generated C library against
    PyTorch float32 eval mode on random inputs; returns the numbers.

    ``repeats`` timed runs per engine and batch size (interleaved); with ``budget`` (seconds) the runs of each
    batch size continue until the budget is spent instead (at least 2 each). The C library is built with
    ``c_flags`` (default ``-O3 -march=native``: this CPU's popcount path), with OpenMP on ``threads`` threads when
    ``threads > 1``.
    """
    if threads < 1 or repeats < 1 or any(b < 1 for b in batch_sizes):
        raise ConfigError("threads, repeats and batch sizes must be >= 1")
    previous = torch.get_num_threads()
    try:
        return _run(model_name, checkpoint, batch_sizes, threads, repeats, budget, memory, seed, progress,
                    tuple(c_flags) if c_engine else None)
    finally:
        torch.set_num_threads(previous)


def _c_library(packed: PackedModel, out_dir: Path, threads: int, flags: tuple[str, ...]
               ) -> tuple[CLibrary, dict[str, Any]]:
    """The model as a C library built with ``flags``, and what to report about it (path, popcount throughput)."""
    info = export_c(packed, out_dir, threads=threads)
    lib = compile_library(info, threads=threads, flags=(*flags, "-DBESTFORMER_BENCH_HOOKS"))
    return lib, {"popcount_path": lib.popcount_path, "openmp": threads > 1, "flags": " ".join(flags),
                 "popcount_words_per_s": popcount_words_per_second(lib, threads),
                 "weight_bytes": info.weight_bytes, "arena_bytes": info.arena_bytes}


def _run(model_name: str, checkpoint: str | None, batch_sizes: Sequence[int], threads: int, repeats: int,
         budget: float | None, memory: bool, seed: int, progress: bool, c_flags: tuple[str, ...] | None
         ) -> dict[str, Any]:
    from ..models import create_model
    from ..training import load_checkpoint

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if checkpoint:
        model, meta = load_checkpoint(checkpoint)
        name = meta["model_name"]
    else:
        model, name = create_model(model_name), model_name
    model.eval()
    results: dict[str, Any] = {"model": name, "threads": threads, "batch_sizes": list(batch_sizes),
                               "cpu": cpu_info().describe()}
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = export_packed(model, Path(tmp) / "model.bst")
        ckpt_path = save_checkpoint(model, Path(tmp) / "model.safetensors")
        results["file_bytes"] = {"packed": packed_path.stat().st_size, "float32": ckpt_path.stat().st_size}
        packed = PackedModel.load(packed_path, threads=threads)
        results["model_bytes"] = {"packed": packed.nbytes,
                                  "float32": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
        clib = None
        if c_flags is not None and find_compiler() is not None:
            clib, results["c"] = _c_library(packed, Path(tmp) / "c", threads, c_flags)
            results["model_bytes"]["c"] = results["c"]["weight_bytes"] + results["c"]["arena_bytes"]
        c, h, w = packed.input_shape
        rng = np.random.default_rng(seed)
        rows = [_bench_batch(model, packed, clib, rng.standard_normal((b, c, h, w)).astype(np.float32), repeats,
                             budget, results["model_bytes"] if memory else None)
                for b in progress_bar(batch_sizes, desc="batch sizes", disable=not progress)]
    results["rows"] = rows
    pc = popcount_throughput(threads)
    fl = sgemm_throughput(threads)
    results["popcount_words_per_s"] = pc
    results["sgemm_macs_per_s"] = fl
    results["bitwise_bound"] = 64 * pc / fl
    if clib is not None:
        results["c"]["bitwise_bound"] = 64 * results["c"]["popcount_words_per_s"] / fl
    results["file_ratio"] = results["file_bytes"]["float32"] / results["file_bytes"]["packed"]
    return results


def format_report(res: dict[str, Any]) -> str:
    """The benchmark as a table; the last line is the latency ratio at each batch size."""
    lines = [f"{res['model']}  threads={res['threads']}  CPU: {res.get('cpu', 'not recorded')}",
             f"file: packed {res['file_bytes']['packed'] / 1e6:.3f} MB vs float32 checkpoint "
             f"{res['file_bytes']['float32'] / 1e6:.2f} MB  ->  {res['file_ratio']:.1f}x smaller",
             f"weights in memory: packed {res['model_bytes']['packed'] / 1e6:.2f} MB vs float32 "
             f"{res['model_bytes']['float32'] / 1e6:.2f} MB",
             f"this CPU: AND+popcount {res['popcount_words_per_s'] / 1e9:.2f} G words/s "
             f"(= {64 * res['popcount_words_per_s'] / 1e9:.0f} G binary MAC/s), float32 GEMM "
             f"{res['sgemm_macs_per_s'] / 1e9:.1f} G MAC/s: bitwise bound {res['bitwise_bound']:.1f}x",
             f"{'batch':>5} {'torch ms':>10} {'packed ms':>10} {'speedup':>8} {'torch MB':>9} {'packed MB':>9} "
             f"{'mem ratio':>9} {'max|dlogit|':>11} {'argmax=':>7} {'runs':>4}"]
    for r in res["rows"]:
        mem = (f"{r['torch_peak_bytes'] / 1e6:9.1f} {r['packed_peak_bytes'] / 1e6:9.1f} {r['memory_ratio']:8.1f}x"
               if "memory_ratio" in r else f"{'n/a':>9} {'n/a':>9} {'n/a':>9}")
        lines.append(f"{r['batch']:>5} {r['torch_s'] * 1e3:10.1f} {r['packed_s'] * 1e3:10.1f} {r['speedup']:7.1f}x "
                     f"{mem} {r['max_abs_logit_diff']:11.2e} {r['argmax_agree']:7.0%} {r['runs']:>4}")
    c = res.get("c")
    if c is not None:
        omp = ", OpenMP" if c["openmp"] else ""
        lines.append(f"C library ({c['popcount_path']} popcount{omp}, {c['flags']}): "
                     f"block product {c['popcount_words_per_s'] / 1e9:.1f} G words/s: bitwise bound "
                     f"{c['bitwise_bound']:.0f}x; weights {c['weight_bytes'] / 1e6:.2f} MB + arena "
                     f"{c['arena_bytes'] / 1e6:.2f} MB")
        lines.append(f"{'batch':>5} {'torch ms':>10} {'C ms':>10} {'speedup':>8} {'C MB':>9} {'bit-equal packed':>17}")
        for r in res["rows"]:
            mem = f"{r['c_peak_bytes'] / 1e6:9.1f}" if "c_peak_bytes" in r else f"{'n/a':>9}"
            lines.append(f"{r['batch']:>5} {r['torch_s'] * 1e3:10.1f} {r['c_s'] * 1e3:10.2f} {r['c_speedup']:7.1f}x "
                         f"{mem} {r['c_bit_equal_packed']!s:>17}")
    lines.append("latency ratio (PyTorch / packed" + (", PyTorch / C" if c else "") + "): " +
                 ", ".join(f"batch {r['batch']}: {r['speedup']:.1f}x" + (f", {r['c_speedup']:.1f}x" if c else "")
                           for r in res["rows"]))
    return "\n".join(lines)


def plot_report(res: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the latencies per batch size (log scale), speedups annotated; PNG written atomically."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    rows = res["rows"]
    xs = np.arange(len(rows))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    engines = [("torch", "PyTorch float32 eval"), ("packed", "packed 1-bit runtime (numba)")]
    engines += [("c", f"C library ({res['c']['popcount_path']})")] if "c" in res else []
    width = 0.8 / len(engines)
    for k, (name, label) in enumerate(engines):
        ax.bar(xs + (k - (len(engines) - 1) / 2) * width, [r[f"{name}_s"] * 1e3 for r in rows], width, label=label)
    for i, r in enumerate(rows):
        note = f"{r['speedup']:.1f}x" + (f" / {r['c_speedup']:.1f}x" if "c_speedup" in r else "")
        ax.annotate(note, (i, r["torch_s"] * 1e3), ha="center", va="bottom")
    ax.set_xticks(xs, [f"batch {r['batch']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch (ms)")
    ax.set_title(f"{res['model']}, {res['threads']} threads")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
