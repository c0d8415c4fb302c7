"""The packed runtime's threads: a kernel's rows split into chunks that run on a pool (the kernels release the GIL).

Imports neither torch nor numba."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: by process (a forked child inherits its parent's pools but not their threads) and thread count
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="bestformer-runtime")
    return _POOLS[key]


#: the fewest rows a chunk is worth a thread's wake-up for: handing a batch-1 token layer's 64 rows to the pool in
#: 8 chunks made 2 threads slower than 1 (22.5 against 12.7 ms per image, bestformer_4_384); with chunks of at
#: least 32 rows, 12.7 ms (and 310 against 299 ms at batch 32)
MIN_CHUNK_ROWS = 32


def split_run(fn: Callable[..., None], n: int, threads: int, *args: Any) -> None:
    """Run ``fn(*args, lo, hi)`` over ``[0, n)`` in chunks on ``threads`` threads (the kernels release the GIL).
    Four chunks per thread balance the load when other processes share the cores; a chunk has at least
    ``MIN_CHUNK_ROWS`` rows, so that a small layer runs on the calling thread."""
    chunks = min(n // MIN_CHUNK_ROWS, 4 * threads) if threads > 1 else 1
    if chunks <= 1:
        fn(*args, 0, n)
        return
    bounds = [n * i // chunks for i in range(chunks + 1)]
    list(_pool(threads).map(lambda i: fn(*args, bounds[i], bounds[i + 1]), range(chunks)))
