"""Progress bars that read well everywhere (issue 23): a tqdm bar on a terminal; when stderr is not a terminal
(a log file, CI, ``make demo > log``) no bar at all, so a log holds no carriage-return redraws, only the library's
own lines (one per epoch in training). ``BESTFORMER_PROGRESS=bar`` forces the bar, ``=off`` hides it."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


def bars_enabled() -> bool:
    """Whether progress bars are drawn: on a terminal, unless ``BESTFORMER_PROGRESS`` says otherwise."""
    mode = os.environ.get("BESTFORMER_PROGRESS", "auto").lower()
    if mode in ("bar", "on", "1"):
        return True
    if mode in ("off", "0", "none"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when bars are not drawn (see :func:`bars_enabled`)."""
    kwargs["disable"] = bool(kwargs.get("disable")) or not bars_enabled()
    return tqdm(iterable, **kwargs)
