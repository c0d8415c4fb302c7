"""Crash-safe file writing: everything the library writes goes to a temporary file in the same folder,
is flushed to disk, then renamed over the target, so a crash leaves either the old or the new file.

Only regular files are ever replaced: a target that is a folder, a device node, a FIFO or a socket (or a link to
one) is refused, so that ``--output /dev/full`` cannot replace the device. New files get the permissions of the
umask, as ``open()`` would give them; a replaced file keeps its own."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FileFormatError


def cache_dir() -> Path:
    """The library's cache (decoded data, compiled kernels): ``$BESTFORMER_CACHE`` (default
    ``~/.cache/bestformer``)."""
    return Path(os.environ.get("BESTFORMER_CACHE", "~/.cache/bestformer")).expanduser()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
            # mkstemp creates 0600; a new file follows the umask, a replaced one keeps its mode
            os.fchmod(fh.fileno(), path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
        refuse_special(path)  # checked again: the target may have appeared while the data were written
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask: read from ``/proc`` where there is one, since setting it to read it (the portable way)
    changes it for a moment for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # it is restored at once
    os.umask(mask)
    return mask


def refuse_special(path: Path) -> None:
    """Refuse to write over anything but a regular file (folders, devices, FIFOs, sockets, links to them)."""
    if (path.exists() or path.is_symlink()) and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, FIFO, socket or broken link)"
        raise FileFormatError(f"{path} is {kind}; give the path of a file to write")


def check_output(path: str | os.PathLike[str], what: str = "output", parents: bool = False) -> Path:
    """Check, before any compute, that ``path`` can be written: a regular file or a new name, in an existing
    (or, with ``parents``, creatable) writable folder. Returns it as a :class:`Path`."""
    path = Path(path)
    if str(path) in ("", "."):
        raise FileFormatError(f"the {what} path is empty; give a file name")
    try:
        refuse_special(path)
    except OSError as err:  # e.g. a name too long for the file system: the path cannot even be looked at
        shown = str(path) if len(str(path)) <= 80 else str(path)[:80] + "..."
        raise FileFormatError(f"cannot write the {what} {shown}: {err.strerror or err}") from None
    folder = path.parent
    if not folder.is_dir():
        if not parents:
            raise FileFormatError(f"cannot write the {what} {path}: the folder {folder} does not exist (create it "
                                  "first)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FileFormatError(f"cannot create the folder {folder} of the {what}: {err.strerror or err}") from None
    check_writable(folder)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read JSON with a one-line error naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{what} {path} is not valid JSON ({err})") from None


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Fail early (before hours of training) when ``folder`` cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise FileFormatError(f"cannot write to {folder}: {err.strerror or err}") from None
