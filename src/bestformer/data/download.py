"""Download of the MNIST and CIFAR files, only when ``build_datasets(..., download=True)`` asks for it.

Each file is fetched from its canonical URL (or the next mirror when one fails), checked against its
published MD5, and written atomically, so an interrupted download never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import FileFormatError
from ..fileio import atomic_path
from ..progress import progress_bar

#: dataset -> (mirrors, [(file name, MD5)]); MD5s as published with the files (and used by torchvision)
RESOURCES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
         ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
         ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
         ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
    ),
    "cifar10": (("https://www.cs.toronto.edu/~kriz/",),
                (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),)),
    "cifar100": (("https://www.cs.toronto.edu/~kriz/",),
                 (("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),)),
}
_BLOCK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` atomically, with a progress bar; the MD5 must match."""
    with atomic_path(dest) as tmp:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for block in iter(lambda: resp.read(_BLOCK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5:
            raise FileFormatError(f"download of {url} is corrupt: MD5 {digest.hexdigest()}, expected {md5}")


def fetch_all(name: str, root: Path, present: Callable[[str], bool]) -> None:
    """Fetch every file of dataset ``name`` into ``root`` unless ``present(file name)``; mirrors in order."""
    mirrors, files = RESOURCES[name]
    root.mkdir(parents=True, exist_ok=True)
    for filename, md5 in files:
        if present(filename):
            continue
        errors = []
        for base in mirrors:
            try:
                fetch(base + filename, root / filename, md5)
                break
            except (urllib.error.URLError, OSError, FileFormatError) as err:
                errors.append(f"{base}: {getattr(err, 'reason', None) or err}")
        else:
            raise FileFormatError(f"cannot download {filename} for {name} ({'; '.join(errors)}); "
                                  f"download it by hand into {root}")
