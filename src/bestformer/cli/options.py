"""Checked argparse types shared by the subcommands: every number is range- and finiteness-checked where it is
parsed (NaN passes every comparison, so ``--budget nan`` would otherwise loop forever), and every output path is
checked before any compute is spent (see :func:`bestformer.fileio.check_output`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from ..errors import FileFormatError
from ..fileio import check_output


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An ``int`` in ``[minimum, maximum]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {_range(minimum, maximum)}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *, positive: bool = False
           ) -> Callable[[str], float]:
    """A finite ``float`` in ``[minimum, maximum]`` (``positive``: > 0)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > 0 if positive else minimum is None or value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            want = "> 0" if positive else _range(minimum, maximum)
            raise argparse.ArgumentTypeError(f"expected a finite number {want}, got {text!r}".replace("  ", " "))
        return value
    parse.__name__ = "float"
    return parse


def output_file(what: str = "output", stdout: bool = False) -> Callable[[str], Path | str]:
    """A file to write: a regular file (replaced) or a new name in an existing, writable folder (``stdout``:
    ``-`` stands for standard output and is returned as is)."""
    def parse(text: str) -> Path | str:
        if stdout and text == "-":
            return text
        try:
            return check_output(text, what)
        except FileFormatError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = "path"
    return parse


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}" if maximum is not None else ""
