"""The ``bestformer`` command line. Each subcommand lives in its own module of this package, exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import BestformerError, close_matches

#: subcommand -> one-line help (the module ``bestformer.cli.<name>`` implements it)
COMMANDS: dict[str, str] = {
    "train": "train a model (no arguments: the demo, bestformer_tiny on scikit-learn digits)",
    "eval": "evaluate a checkpoint on a dataset (top-1 / top-5)",
    "profile": "model size, MACs, firing rates, SOPs, energy and NS-ACE of a model or checkpoint",
    "export": "write a deployment file (packed 1-bit model or NIR graph) from a checkpoint",
    "predict": "run a packed model file on inputs with the bit-packed runtime",
    "bench": "benchmark the packed runtime against PyTorch",
    "convert": "convert a trained CSDformer ANN checkpoint into a spike-driven model",
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bestformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    p.add_argument("--version", action="store_true", help="print the library version and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if "--version" in argv:
            from .. import __version__

            print(__version__)
            return 0
        if not argv:  # the README's main job
            argv = ["train"]
        else:
            _top_parser().parse_args(argv)
            return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"bestformer: error: unknown command {command!r}{close_matches(command, COMMANDS)}; "
              f"expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{command}")
    parser = argparse.ArgumentParser(prog=f"bestformer {command}", description=COMMANDS[command])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except BestformerError as err:
        print(f"bestformer {command}: error: {err}", file=sys.stderr)
        return 2
