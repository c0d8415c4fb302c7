"""The library's own error types: every user-facing failure is one line naming what was wrong and what
was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class Terminated(BaseException):
    """SIGTERM received outside the training loop (or a second one inside it): the CLI exits 143. A
    ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it."""


class BestformerError(ValueError):
    """Base class of every error the library raises on purpose (bad input, bad file, bad config)."""


class ConfigError(BestformerError):
    """An option, model name, recipe key or argument has a wrong name, type or value."""


class InputError(BestformerError):
    """A tensor or dataset given to the library does not have the expected shape, range or content."""


class FileFormatError(BestformerError):
    """A file (checkpoint, packed model, event recording, dataset file) is missing, truncated or corrupt."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the closest choices, or an empty string."""
    hits = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not hits:
        return ""
    return " (did you mean " + ", ".join(repr(h) for h in hits) + "?)"


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``; return it."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"unknown {what} {value!r}{close_matches(str(value), choices)}; expected one of "
            + ", ".join(repr(c) for c in choices)
        )
    return value
