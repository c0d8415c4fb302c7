"""Run folders: ``runs/<name>/`` with everything a training run writes.

===================  =====================================================================================
``config.yaml``      the resolved options (usable again as ``--recipe``); the global batch in a comment
``run.json``         how the run was started: recipe, global batch, world size, device, versions
``metrics.csv``      one row per epoch: losses, accuracies, lr, time, gradient norm, firing rate, health
``firing_rates.csv`` mean firing rate of every spiking layer per epoch (sampled steps)
``curves.png``       loss and accuracy curves
``last.safetensors`` the latest weights (+ ``last.json`` sidecar), ``best.safetensors`` the best on validation
``resume.safetensors`` weights, optimizer, RNG, position and history for ``--resume``
``summary.json``     final validation / test results (when the run finished)
``teacher/``         the run folder of a teacher trained first
``.lock``            held (``flock``) while a run writes the folder: a second run on it is refused
===================  =====================================================================================

Only the main process (rank 0) writes; every write is atomic. A write that fails (full disk, read-only
folder) raises one :class:`~bestformer.errors.FileFormatError` saying that the previous file is intact.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, FileFormatError
from ..fileio import atomic_path, atomic_write_json, atomic_write_text, check_writable
from .checkpoint import save_checkpoint
from .config import dump_yaml
from .state import RESUME_FILE, save_resume_state

#: seconds a run waits for its folder's lock before refusing: a lock held for a moment (another process checking
#: whether the folder is in use, as ``benchmarks/ablation.py`` does) is not a run
LOCK_WAIT = 1.0


def _flock_within(fcntl: Any, fh: Any, seconds: float) -> None:
    """``flock(fh, LOCK_EX)``, retried for ``seconds``; raises :class:`BlockingIOError` if still held then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


#: the files a run writes into its folder (all through atomic writes)
OWN_FILES = frozenset({"config.yaml", "run.json", "metrics.csv", "firing_rates.csv", "curves.png", "summary.json",
                       "profile.json", RESUME_FILE, "best.safetensors", "best.json", "last.safetensors", "last.json"})


def default_run_name(model: str, dataset: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{dataset}"


class RunFolder:
    """The files of one run (``enabled=False`` on ranks other than 0: every write is then skipped)."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard: Any = None  # a TensorBoardLog with --log tensorboard (set by the runner)

    config_path = property(lambda self: self.path / "config.yaml")
    resume_path = property(lambda self: self.path / RESUME_FILE)
    metrics_path = property(lambda self: self.path / "metrics.csv")
    firing_path = property(lambda self: self.path / "firing_rates.csv")
    plot_path = property(lambda self: self.path / "curves.png")

    def weights_path(self, kind: str) -> Path:
        return self.path / f"{kind}.safetensors"

    @property
    def teacher(self) -> RunFolder:
        return RunFolder(self.path / "teacher", self.enabled)

    def has_checkpoint(self) -> bool:
        return self.resume_path.is_file()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder while a run uses it, so that a second run started with the same
        ``--name`` (or resuming it) fails at once instead of mixing its files with this one's."""
        if not self.enabled:
            yield
            return
        check_writable(self.path)
        lock = self.path / ".lock"
        try:  # O_NOFOLLOW: a .lock planted as a link must not make us truncate the file it points to
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise FileFormatError(f"cannot open the run folder's lock {lock}: {err.strerror or err}") from None
        with os.fdopen(fd, "r+", encoding="utf-8") as fh:
            try:
                import fcntl
            except ImportError:  # not POSIX (Windows): no advisory lock
                yield
                return
            try:
                _flock_within(fcntl, fh, LOCK_WAIT)
            except BlockingIOError:
                owner = fh.read().strip() or "another process"
                raise ConfigError(f"run folder {self.path} is in use by another run ({owner}); wait for it to end, "
                                  "or choose another --name") from None
            except OSError as err:
                raise FileFormatError(f"cannot lock the run folder {self.path} ({err.strerror or err}; a file "
                                      "system without flock?)") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
            self._remove_partial_writes()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of this folder's own writes (:func:`~bestformer.fileio.atomic_path`) that a
        killed run left behind (a SIGKILL skips the clean-up; a resume state's can be hundreds of MB). Only the
        lock's holder writes these files, so any found now are dead; other programs' temporaries stay."""
        for tmp in self.path.glob(".*.tmp"):
            name, dot, _ = tmp.name[1:-len(".tmp")].rpartition(".")
            if dot and name in OWN_FILES and tmp.is_file() and not tmp.is_symlink():
                with contextlib.suppress(OSError):  # one not ours to delete stays: it only takes space
                    tmp.unlink()

    def prepare(self) -> None:
        """Create the folder and check that it is writable (before any training time is spent)."""
        if self.enabled:
            check_writable(self.path)

    def _write(self, target: Path, write: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return write()
        except OSError as err:
            raise FileFormatError(f"cannot write {target}: {err.strerror or err}; the previous file (if any) is "
                                  "intact; free some space or choose another --out") from None

    def write_config(self, config: dict[str, Any], info: dict[str, Any]) -> None:
        head = (f"# bestformer run {self.path.name}: global batch {info['global_batch']} = batch_size "
                f"{config['batch_size']} x accum_steps {config['accum_steps']} x world_size {info['world_size']}\n")
        self._write(self.config_path, lambda: atomic_write_text(self.config_path, head + dump_yaml(config)))
        self._write(self.path / "run.json", lambda: atomic_write_json(self.path / "run.json", info))

    def write_history(self, history: list[dict[str, Any]], firing: list[dict[str, float]]) -> None:
        """Rewrite ``metrics.csv``, ``firing_rates.csv`` and ``curves.png`` from the full history."""
        self._write(self.metrics_path, lambda: atomic_write_text(self.metrics_path, _csv(history)))
        # files of epochs a crash left unfinished go with them: no rows or curves beside an empty history
        if firing:
            self._write(self.firing_path, lambda: atomic_write_text(self.firing_path, _csv(firing)))
        else:
            self._write(self.firing_path, lambda: self.firing_path.unlink(missing_ok=True))
        if history:
            self._write(self.plot_path, lambda: plot_curves(history, self.plot_path))
        else:
            self._write(self.plot_path, lambda: self.plot_path.unlink(missing_ok=True))
        if self.tensorboard is not None:
            self._write(self.path / "tensorboard", lambda: self.tensorboard.epochs(history, firing))

    def save_model(self, kind: str, model: nn.Module, meta: dict[str, Any]) -> None:
        path = self.weights_path(kind)
        self._write(path, lambda: save_checkpoint(model, path, **meta))

    def save_resume(self, *args: Any) -> None:
        self._write(self.resume_path, lambda: save_resume_state(self.resume_path, *args))

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write(self.path / "summary.json", lambda: atomic_write_json(self.path / "summary.json", summary))


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                             for k, v in row.items()})
    return buf.getvalue()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, as a PNG (matplotlib)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "top-1 accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        if any(math.isfinite(r[f"val_{key}"]) for r in history):
            ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def resolve_run_folder(spec: str | os.PathLike[str], out: str | os.PathLike[str] = "runs") -> RunFolder:
    """The run folder named by ``--resume``: a run folder, a file inside it (``last.safetensors``,
    ``resume.safetensors``), or ``"last"`` (the run under ``out`` with the most recent resume state)."""
    if str(spec) == "last":
        root = Path(out)
        candidates = sorted((p for p in root.glob(f"*/{RESUME_FILE}")), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"--resume last: no run with a checkpoint under {root}/")
        return RunFolder(candidates[-1].parent)
    path = Path(spec)
    if path.is_file():
        path = path.parent
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume {spec}: {path} is not a run folder (no config.yaml); give runs/<name>, "
                          "a checkpoint inside it, or 'last'")
    return RunFolder(path)
