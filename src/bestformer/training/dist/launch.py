"""The ``--nproc`` launcher: re-run the command line in N local processes through torchrun's own launcher."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from ...errors import ConfigError
from .context import DistributedError, launched_by_torchrun
from .sampler import _positive_int


def remove_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (what the launcher strips before relaunching)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, args: Sequence[str], module: str = "bestformer") -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m bestformer ARGS`` (as ``python -m torch.distributed.run``,
    so the current interpreter and environment are used)."""
    n = _positive_int("--nproc", nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", module, *args]


@contextlib.contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    """Put back every Python-level signal handler on the way out: torchrun's launcher installs its own for SIGINT,
    SIGTERM, SIGHUP and SIGQUIT (``TORCHELASTIC_SIGNALS_TO_HANDLE``) and never removes them, so after an
    in-process launch Ctrl-C in the caller (a notebook, a script that goes on) would raise torchrun's
    ``SignalException`` instead of ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return
    # getsignal is None for a handler not set from Python: nothing we could put back
    saved = {sig: h for sig in signal.valid_signals() if (h := signal.getsignal(sig)) is not None}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def launch_torchrun(nproc: int, args: Sequence[str], module: str = "bestformer") -> int:
    """Run ``args`` in ``nproc`` processes on this machine through torchrun's launcher (in this process; the
    workers are new processes); returns 0 when every worker succeeded. When one fails, the launcher stops the
    others and this raises one :class:`DistributedError` line naming the failed rank and its exit code (the
    worker's own error is printed above it) instead of the launcher's traceback."""
    if launched_by_torchrun():
        raise ConfigError("--nproc starts torchrun itself; inside a torchrun worker leave it out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(torchrun_command(nproc, args, module)[3:])
    try:
        with _restored_signal_handlers():
            run(launcher_args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exited with code {code}"
        raise DistributedError(f"worker rank {rank} of {nproc} {how}; torchrun stopped the other workers (the "
                               "failed worker's own error, if it printed one, is above)") from None
    return 0
