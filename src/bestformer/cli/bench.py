"""``bestformer bench``: the packed runtime against the same model in PyTorch float32 eval mode, side by side in
one process (latency, peak memory, file size; the latency ratio is printed last). See docs/deploy.md."""

from __future__ import annotations

import argparse

from .options import integer, number, output_file

HELP = "benchmark the packed runtime against PyTorch"
DEFAULT_PLOT = "runs/bench/deploy.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bestformer_4_384", help="registered 1-bit model (random weights)")
    parser.add_argument("--checkpoint", default=None, help="benchmark this checkpoint instead of --model")
    parser.add_argument("--batch-sizes", type=integer(1, 65536), nargs="+", default=[1, 32], help="batch sizes to time")
    parser.add_argument("--threads", type=integer(1), default=2, help="CPU threads for both engines")
    parser.add_argument("--repeats", type=integer(1), default=5, help="timed runs per engine and batch size")
    parser.add_argument("--budget", type=number(positive=True), default=None,
                        help="seconds of timed runs per batch size instead of --repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-c", action="store_true", help="skip the C library engine (needs a C compiler)")
    parser.add_argument("--c-flags", default=None,
                        help="compiler flags of the C engine instead of '-O3 -march=native' (e.g. '-O3 -mavx2 "
                             "-mpopcnt' for the AVX2 path)")
    parser.add_argument("--plot", default=None, type=output_file("plot"),
                        help=f"PNG chart of the latencies (default: {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="draw no chart")
    parser.add_argument("--json", default=None, type=output_file("JSON file"),
                        help="also write the numbers to this JSON file")


def run(args: argparse.Namespace) -> int:
    import os

    # PyTorch's OpenMP pool must be sized before torch starts it: without OMP_NUM_THREADS its threads spin and
    # collapse (5x slower, measured) when other processes share the cores, which would flatter the packed runtime.
    # numpy's OpenBLAS (the packed runtime's float64 heads: tiny products) keeps its threads spinning after each
    # call, which halved the C library's OpenMP speed at 2 threads (8.4 vs 4.1 ms, measured): one BLAS thread.
    # Put back afterwards: a caller that runs the command in its own process must not pass them to its children.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        return _run(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(args: argparse.Namespace) -> int:
    from ..deploy.bench import format_report, plot_report, run_benchmark
    from ..deploy.c_build import SPEED_FLAGS
    from ..fileio import atomic_write_json, check_output

    plot = None if args.no_plot else args.plot or check_output(DEFAULT_PLOT, "plot", parents=True)
    res = run_benchmark(args.model, args.checkpoint, args.batch_sizes, args.threads, args.repeats, args.budget,
                        memory=not args.no_memory, c_engine=not args.no_c,
                        c_flags=args.c_flags.split() if args.c_flags else SPEED_FLAGS)
    if plot is not None:
        print(f"plot: {plot_report(res, plot)}")
    if args.json:
        atomic_write_json(args.json, res)
    print(format_report(res))
    return 0
