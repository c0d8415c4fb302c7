"""bestformer on the command line: train, evaluate, profile, convert and deploy compact spiking transformers.

Each subcommand lives in its own module of this package, exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; only the chosen one is imported.

Exit status: 0 on success; 2 for a wrong option, a missing or damaged file, or any other error the user can fix
(one line on stderr, a traceback only with ``--debug``); 1 for an internal error (one line; ``--debug`` shows it);
130 after SIGINT (Ctrl-C) and 143 after SIGTERM (training saves its checkpoint first).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
import zipfile
from collections.abc import Sequence

from ..errors import BestformerError, Terminated, close_matches

#: errors of reading or writing files and of the formats under them: the user's to fix, reported in one line
USER_ERRORS = (OSError, zipfile.BadZipFile, EOFError, UnicodeError, MemoryError)

#: subcommand -> one-line help (the module ``bestformer.cli.<name>`` implements it)
COMMANDS: dict[str, str] = {
    "train": "train a model (no arguments: the demo, bestformer_tiny on scikit-learn digits)",
    "eval": "evaluate a checkpoint on a dataset (top-1 / top-5)",
    "profile": "model size, MACs, firing rates, SOPs, energy and NS-ACE of a model or checkpoint",
    "export": "write a deployment file (packed 1-bit model or NIR graph) from a checkpoint",
    "predict": "run a packed model file on inputs with the bit-packed runtime",
    "bench": "benchmark the packed runtime against PyTorch",
    "convert": "convert a trained CSDformer ANN checkpoint into a spike-driven model",
    "zoo": "list the pretrained models that ship with the package (--json: as JSON)",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, whose errors are one line (what was wrong, and where the options are listed) instead of the usage
    block followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _top_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bestformer", description=__doc__.split("\n\n")[0],
                                epilog="add --debug to any command to see the traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    p.add_argument("--version", action="store_true", help="print the library version and exit")
    return p


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated  # outside the training loop, which handles SIGTERM itself (saving first)


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line. An error re-raised from a data-loading worker carries the worker's
    traceback in its message; its last line is the original message."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, OSError) and err.strerror:
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        text = f"{err.strerror}{': ' + ' -> '.join(names) if names else ''}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BESTFORMER_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return _dispatch(argv, debug)
    except KeyboardInterrupt:
        print("\nbestformer: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print("\nbestformer: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _dispatch(argv: list[str], debug: bool) -> int:
    if not argv or argv[0].startswith("-"):
        if "--version" in argv:
            from ..version import __version__

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
    parser = OneLineParser(prog=f"bestformer {command}", description=COMMANDS[command])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # a wrong option: argparse printed usage and the error; return its status
        if exc.code in (0, None):  # --help
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        return int(module.run(args) or 0)
    except (BestformerError, *USER_ERRORS) as err:
        if debug:  # the traceback too, with the exit status of a fixable error
            traceback.print_exc()
        print(f"bestformer {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, the traceback on request
        if debug:
            raise
        print(f"bestformer {command}: internal error: {type(err).__name__}: {one_line(err)} (run it again with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1
