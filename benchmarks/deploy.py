"""Packed 1-bit runtime vs PyTorch float32 eval mode for bestformer_4_384 (T=4, 32x32), side by side in one
process: latency at batch 1 and 32, peak memory, file size, and this CPU's popcount / float32 throughput. The
latency ratio is printed last.

    .venv/bin/python benchmarks/deploy.py                  # 5 runs per engine and batch size
    .venv/bin/python benchmarks/deploy.py --budget 20      # ~20 s of timed runs per batch size
    .venv/bin/python benchmarks/deploy.py --model bestformer_tiny --batch-sizes 1 8   # a quick look

Same options as ``bestformer bench``.
"""

from __future__ import annotations

import argparse
import sys

from bestformer.cli import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
