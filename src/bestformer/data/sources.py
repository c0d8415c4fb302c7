"""Where dataset files come from: a folder or a tar archive read in place, and the decoded-data cache.

A :class:`FileTree` lists files as POSIX paths relative to its root and reads their bytes. :func:`locate`
finds a dataset's layout in ``data_dir``: the folder itself, one top-level folder inside it, or a
``.tar``/``.tar.gz``/``.tgz`` archive given directly or lying in the folder (read without extracting).
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ..fileio import atomic_path, cache_dir

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


class FileTree(abc.ABC):
    """A read-only set of files: ``files()`` (relative POSIX paths, sorted) and ``read(name)``."""

    label: str

    @abc.abstractmethod
    def files(self) -> list[str]: ...

    @abc.abstractmethod
    def folders(self) -> list[str]: ...

    def entries(self) -> list[str]:
        """:meth:`files` and every folder as ``"path/"``: an empty (class) folder has no file to show it."""
        return sorted([*self.files(), *(f"{d}/" for d in self.folders())])

    @abc.abstractmethod
    def read(self, name: str) -> bytes: ...

    def describe(self, name: str) -> str:
        """How to name a file of this tree in an error message."""
        return f"{self.label}/{name}"


class DirTree(FileTree):
    """The files under a folder (hidden files and folders skipped), read lazily."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.label = str(self.root)
        self._files: list[str] | None = None
        self._folders: list[str] = []

    def folders(self) -> list[str]:
        self.files()
        return self._folders

    def files(self) -> list[str]:
        if self._files is None:
            found, folders, seen = [], [], set()
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:  # a symlink cycle: do not walk it again
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(self.root)
                found += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
                folders += [(rel / d).as_posix() for d in dirnames]
            self._files, self._folders = sorted(found), sorted(folders)
        return self._files

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as err:
            raise FileFormatError(f"cannot read {self.root / name}: {err.strerror or err}") from None


class TarTree(FileTree):
    """The regular files of a tar archive (optionally gzipped), decompressed once into memory.

    Members are read by offset from the in-memory copy, so random access costs nothing after the one pass
    (our choice over extracting: nothing is written beside the user's data).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        try:
            raw = self.path.read_bytes()
        except OSError as err:
            raise FileFormatError(f"cannot read archive {self.path}: {err.strerror or err}") from None
        try:
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
                entries = list(tf)
                members = {self._clean(m.name): (m.offset_data, m.size) for m in entries if m.isfile()}
                folders = {self._clean(m.name).rstrip("/") for m in entries if m.isdir()}
        except (OSError, tarfile.TarError, EOFError, zlib.error) as err:  # OSError: gzip.BadGzipFile
            raise FileFormatError(f"archive {self.path} is truncated or not a tar archive ({err})") from None
        self._data = raw
        self._members = {k: v for k, v in members.items() if not any(p.startswith(".") for p in k.split("/"))}
        self._names = sorted(self._members)
        self._folders = sorted(d for d in folders if d and not any(p.startswith(".") for p in d.split("/")))
        for name, (offset, size) in self._members.items():
            if offset + size > len(self._data):
                raise FileFormatError(f"archive {self.path} is truncated: member {name} is cut off")

    @staticmethod
    def _clean(name: str) -> str:
        return name[2:] if name.startswith("./") else name

    def files(self) -> list[str]:
        return self._names

    def folders(self) -> list[str]:
        return self._folders

    def read(self, name: str) -> bytes:
        try:
            offset, size = self._members[name]
        except KeyError:
            raise FileFormatError(f"{name} is not in archive {self.path}") from None
        return self._data[offset : offset + size]

    def describe(self, name: str) -> str:
        return f"{name} (in {self.label})"


def open_tree(path: Path) -> FileTree:
    return TarTree(path) if path.is_file() else DirTree(path)


def locate(data_dir: Path, find: Callable[[list[str]], str | None], what: str, expected: str
           ) -> tuple[FileTree, str]:
    """Find a dataset layout: returns the tree and the prefix (``""`` or ``"top/"``) of the layout in it.

    ``find(files)`` returns the prefix of the layout within a listing, or ``None``. Tried in order: ``data_dir``
    as an archive, the folder itself, then each archive lying directly in it (sorted by name).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise FileFormatError(f"{what}: data_dir {data_dir} does not exist (expected {expected})")
    if data_dir.is_file():
        if not is_archive(data_dir):
            raise FileFormatError(f"{what}: {data_dir} is a file but not a .tar/.tar.gz/.tgz archive "
                                  f"(expected a folder or an archive holding {expected})")
        candidates = [data_dir]
    else:
        candidates = [data_dir, *sorted(p for p in data_dir.iterdir() if p.is_file() and is_archive(p))]
    for cand in candidates:
        tree = open_tree(cand)
        prefix = find(tree.files())
        if prefix is not None:
            return tree, prefix
    raise FileFormatError(f"no {what} found in {data_dir}: expected {expected}")


def top_prefixes(files: list[str]) -> list[str]:
    """Candidate layout roots: ``""`` and each top-level folder (``"name/"``)."""
    tops = sorted({f.split("/", 1)[0] + "/" for f in files if "/" in f})
    return ["", *tops]


def fingerprint(path: Path) -> str:
    """Cache key of a data source: its resolved path with the size and mtime of the file, or of every file
    under the folder (archives are not opened), so any change to the data gives a new key."""
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode())
    files = [path] if path.is_file() else [path / f for f in DirTree(path).files()]
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else ''}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_cached(name: str) -> dict[str, np.ndarray] | None:
    """Arrays saved by :func:`save_cached`, or ``None`` when absent or unreadable (then rebuilt)."""
    path = cache_dir() / name
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
        return None


def save_cached(name: str, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` atomically as ``$BESTFORMER_CACHE/name`` (uncompressed ``.npz``)."""
    path = cache_dir() / name
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path
