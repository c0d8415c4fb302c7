"""Compile an exported C library (:func:`bestformer.deploy.c_export.export_c`) with the system's C compiler and
call it from Python through ctypes: for benchmarks (``benchmarks/deploy.py``'s third engine) and tests.

``compile_library(info, threads=2)`` builds ``model.c`` into a shared object with the flags the generated code
needs (``-std=c99 -ffp-contract=off``) plus, by default, ``-O3 -march=native`` (the vector popcount path of this
CPU, the float loops vectorized) and, with ``threads > 1``, OpenMP. Every build gives the same bits; the flags
change only the time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path
from .c_export import CFLAGS, CExportInfo

#: -O3 vectorizes the LIF / BatchNorm loops (about 3x at -O2 on x86, measured); -march=native picks the popcount path
SPEED_FLAGS = ("-O3", "-march=native")
#: shared objects loaded in this process: dlopen hands back the first library loaded from a path, so a library
#: rebuilt at that path would run the old model's code with the new model's sizes
_LOADED: set[Path] = set()


def find_compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on ``PATH`` (``None``: no compiler)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


class CLibrary:
    """A compiled model: ``predict(x)`` runs ``bestformer_predict`` on each sample of a batch (``[B, C, H, W]``, or
    ``[T, B, C, H, W]`` event frames) and returns the logits ``[B, classes]``; ``popcount_path`` names the popcount
    path compiled in. One arena, so one call at a time per object."""

    def __init__(self, path: str | Path, info: CExportInfo):
        self.path = Path(path)
        self.info = info
        self.lib = ctypes.CDLL(str(self.path.resolve()))  # dlopen matches by this string: the same key as _LOADED
        _LOADED.add(self.path.resolve())
        self.lib.bestformer_predict.argtypes = [ctypes.c_void_p, ctypes.c_size_t] * 3
        self.lib.bestformer_predict.restype = ctypes.c_int
        self.lib.bestformer_popcount_path.restype = ctypes.c_char_p
        self.popcount_path: str = self.lib.bestformer_popcount_path().decode()
        self.arena = np.zeros(-(-info.arena_bytes // 8), np.uint64)  # 8-byte aligned, as the API asks

    def call(self, sample: np.ndarray, arena: int | None = None) -> tuple[int, np.ndarray]:
        """``bestformer_predict`` on one sample (``arena``: another address, for tests): its return code and the
        logits."""
        x = np.ascontiguousarray(sample, np.float32)
        if x.size != self.info.input_size:
            raise ConfigError(f"one sample has {self.info.input_size} values {self.info.input_shape}, got {x.shape}")
        out = np.full(self.info.num_classes, np.nan, np.float32)
        rc = self.lib.bestformer_predict(x.ctypes.data, x.size, out.ctypes.data, out.size,
                                         self.arena.ctypes.data if arena is None else arena, self.info.arena_bytes)
        return rc, out

    def predict(self, x: np.ndarray) -> np.ndarray:
        samples = [x[:, i] for i in range(x.shape[1])] if self.info.events else list(x)
        outs = []
        for s in samples:
            rc, out = self.call(s)
            if rc != 0:
                raise ConfigError(f"bestformer_predict returned {rc} (see BESTFORMER_ERR_* in model.h)")
            outs.append(out)
        return np.stack(outs)


def build_shared(info: CExportInfo, threads: int = 1, flags: Sequence[str] = SPEED_FLAGS,
                 compiler: str | None = None, output: str | Path | None = None) -> Path:
    """Build ``info``'s ``model.c`` into a shared object; its path: ``output``, by default ``model-<hash>.so``
    beside it, named after the code and the command (an ``output`` already loaded in this process is refused: it
    could not be loaded again). The generated code's ``CFLAGS`` come first, then ``flags`` (default: this CPU's
    fastest build; e.g. ``("-O3", "-mavx2", "-mpopcnt")`` for the AVX2 path). ``threads > 1`` adds ``-fopenmp``
    (the arena must hold that many scratch sets: ``export_c(threads=...)``)."""
    cc = compiler or find_compiler()
    if cc is None:
        raise ConfigError("no C compiler found: install cc, gcc or clang, or set CC")
    if threads > info.threads:
        raise ConfigError(f"the library was exported for {info.threads} thread(s), not {threads}: "
                          f"export_c(threads={threads})")
    cmd = [cc, *CFLAGS, *(("-fopenmp",) if threads > 1 else ()), *flags, "-fPIC", "-shared", str(info.files["model.c"])]
    digest = hashlib.sha256("\0".join(cmd).encode() + b"\0" + info.files["model.c"].read_bytes()).hexdigest()
    so = Path(output) if output else info.out_dir / f"model-{digest[:16]}.so"
    if not output and so.resolve() in _LOADED:
        return so  # the same code built the same way, already loaded
    if output and so.resolve() in _LOADED:
        raise ConfigError(f"{so} is already loaded in this process, and a library rebuilt there would not be "
                          "loaded again (dlopen keeps the first); build to another output path")
    # built beside it under a name of its own, then renamed: another process loading the same library never
    # maps a half-written file
    with atomic_path(so) as tmp:
        done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:  # the first diagnostic says why (the last is often "warnings treated as errors")
            lines = done.stderr.strip().splitlines() or [""]
            why = next((line for line in lines if ": error" in line or ": warning" in line), lines[-1])
            raise ConfigError(f"{' '.join([*cmd, '-o', str(so)])} failed: {why}")
    return so


def compile_library(info: CExportInfo, threads: int = 1, flags: Sequence[str] = SPEED_FLAGS,
                    compiler: str | None = None, output: str | Path | None = None) -> CLibrary:
    """:func:`build_shared`, loaded."""
    return CLibrary(build_shared(info, threads, flags, compiler, output), info)


def popcount_words_per_second(lib: CLibrary, threads: int = 1, seconds: float = 0.5) -> float:
    """AND+popcount words per second of the library's block product on L1-resident data, on ``threads`` threads
    at once (ctypes releases the GIL), from the ``bestformer_bench_popcount`` hook (built with
    ``-DBESTFORMER_BENCH_HOOKS``)."""
    fn = lib.lib.bestformer_bench_popcount
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_double
    scratch = [np.zeros(3 * 1024, np.uint64) for _ in range(threads)]  # >= BF_BENCH_SCRATCH_BYTES each
    reps, best = 2048, 0.0  # ~10 ms per call and thread
    with ThreadPoolExecutor(threads) as pool:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            words = sum(pool.map(lambda buf: fn(reps, buf.ctypes.data), scratch))
            best = max(best, words / (time.perf_counter() - t0))
    return best
