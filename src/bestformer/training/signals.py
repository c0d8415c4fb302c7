"""Graceful stops of a training loop: SIGINT / SIGTERM finish the current step and write a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any

from ..errors import Terminated
from .dist import DistContext
from .evaluation import log_main


class StopSignals:
    """While active, SIGINT and SIGTERM only set :attr:`received` (the loop stops after the current step);
    a second signal restores the default behaviour and raises ``KeyboardInterrupt`` at once."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is not None:  # the second signal: stop at once (exit 130 / 143, as the signal says)
            self._restore()
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        self.received = signal.Signals(signum).name
        log_main(self.ctx, f"\n{self.received} received: finishing the current step and writing a checkpoint "
                           "(send it again to stop at once without saving)", err=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
