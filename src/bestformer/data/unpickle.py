"""A restricted unpickler for untrusted data pickles (the canonical CIFAR python batches are its one user).

:func:`safe_unpickle` (1) walks the opcode stream first without executing it, allowing only the opcodes a dict of
lists, strings and numpy arrays needs, with memo indices that cannot ask for huge tables, (2) runs the unpickler
with a ``find_class`` that maps the only globals such a pickle references (numpy's array reconstruction,
``dtype``, ``_codecs.encode``) to inert stand-ins, fresh for each load, that BUILD cannot change, and (3) replaces
the array stand-ins in one pass that visits every shared object once (a few hundred bytes of pickle can reference
one list 2**30 times), refuses cycles and stops after as many objects as the pickle has bytes. No numpy code runs
on file data until the final, checked ``np.frombuffer``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import BestformerError, FileFormatError

# The binary opcodes of protocols 2-5 that a dict of lists, strings, numbers and numpy arrays needs (the
# canonical batches are protocol 2); no object construction (NEWOBJ, INST, OBJ), extensions or buffers.
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT",
    "BINSTRING", "SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
})
_NUMERIC_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}
_MAX_DEPTH = 32
_MAX_DIMS = 8


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a pickle: not callable, no attributes can be set on it."""

    __slots__ = ()


_NDARRAY = _NdarrayToken()


class _DtypeStub:
    """Stands for ``numpy.dtype(spec, align, copy)``; keeps the spec and the byte order of its state."""

    def __init__(self, spec: Any, *_: Any) -> None:
        if not isinstance(spec, str) or spec.lstrip("<>|=") not in _NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"array dtype {spec!r} is not a plain numeric type")
        self.spec, self.order = spec, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def dtype(self) -> np.dtype:
        spec = self.spec.lstrip("<>|=")
        return np.dtype(spec).newbyteorder(self.order if self.order != "|" else "=")


class _ArrayStub:
    """Stands for an ndarray under reconstruction: keeps shape, dtype and raw bytes for a checked rebuild."""

    def __init__(self) -> None:
        self.state: tuple[Any, ...] | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed array state")
        self.state = state

    def build(self, source: str) -> np.ndarray:
        if self.state is None:
            raise FileFormatError(f"{source}: an array in the pickle has no data")
        _, shape, dtype, fortran, raw = self.state
        return _checked_array(raw, dtype, shape, bool(fortran), source)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("array reconstruction of a type other than numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    stub = _ArrayStub()
    stub.state = (1, shape, dtype, order == "F", buf)
    return stub


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2: only ``(str, 'latin1')`` is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1-encoded byte strings are accepted")
    return text.encode("latin1")


def _checked_array(raw: Any, dtype: Any, shape: Any, fortran: bool, source: str) -> np.ndarray:
    if isinstance(raw, str):  # a Python 2 byte string, decoded as latin1 by the unpickler
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(dtype, _DtypeStub):
        raise FileFormatError(f"{source}: malformed array in the pickle")
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= len(raw) for d in shape):
        # every dimension of a non-empty array is at most its byte count; the shape's text may be huge: not shown
        raise FileFormatError(f"{source}: malformed array shape in the pickle (at most {_MAX_DIMS} dimensions of "
                              f"at most {len(raw)}, the bytes it holds)")
    dt = dtype.dtype()
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(raw):
        raise FileFormatError(f"{source}: array of shape {shape} needs {n * dt.itemsize} bytes, the pickle holds "
                              f"{len(raw)} (truncated or corrupt)")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")


class _StandIn:
    """A global of the pickle mapped to one of the checked functions above. BUILD cannot change it (a pickle could
    otherwise set attributes on this library's own functions for the rest of the process)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("the pickle tries to change a function it references")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("the pickle tries to change a function it references (BUILD)")


class _SafeUnpickler(pickle.Unpickler):
    _GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeStub,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never "
                                         "contains; refusing to load it") from None
        return found if found is _NDARRAY else _StandIn(found)


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without executing them: only allowed opcodes, memo indices below the opcode count."""
    with warnings.catch_warnings():  # genops decodes text opcodes' arguments, warning on bad escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if op.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(f"opcode {op.name} is not allowed in a CIFAR batch")
            if op.name in ("BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= count):
                raise pickle.UnpicklingError(f"memo index {arg!r} out of range")


class _Resolver:
    """Replaces array stand-ins by checked arrays through dicts, lists and tuples, visiting each shared object once
    (sharing is kept), refusing cycles, nesting deeper than :data:`_MAX_DEPTH` and more than ``budget`` objects."""

    def __init__(self, source: str, budget: int) -> None:
        self.source, self.budget = source, budget
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()
        self.keep: list[Any] = []  # holds the originals, so that their ids stay unique during the pass

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise FileFormatError(f"{self.source}: the pickle nests deeper than a CIFAR batch does")
        if isinstance(obj, (_DtypeStub, _NdarrayToken, _StandIn)):
            raise FileFormatError(f"{self.source}: a dtype, type or function object where data was expected")
        if not isinstance(obj, (_ArrayStub, dict, list, tuple)):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise FileFormatError(f"{self.source}: the pickle holds a container that contains itself")
        self.budget -= 1
        if self.budget < 0:
            raise FileFormatError(f"{self.source}: the pickle holds more objects than its size allows")
        self.active.add(key)
        self.keep.append(obj)
        if isinstance(obj, _ArrayStub):
            out: Any = obj.build(self.source)
        elif isinstance(obj, dict):
            out = {self(k, depth + 1): self(v, depth + 1) for k, v in obj.items()}
        else:
            out = type(obj)(self(v, depth + 1) for v in obj)
        self.active.discard(key)
        self.done[key] = out
        return out


def safe_unpickle(data: bytes, source: str = "<bytes>") -> Any:
    """Load a pickle that may only hold dicts, lists, tuples, numbers, strings and numeric numpy arrays.

    Python 2 pickles (the canonical CIFAR batches) are read with ``encoding="latin1"``. Anything else, and
    any corrupt or truncated stream, raises :class:`FileFormatError` naming ``source``.
    """
    try:
        _check_opcodes(data)
        obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except BestformerError:
        raise
    except Exception as err:  # any failure of the pickle machine on file bytes means a bad file
        raise FileFormatError(f"{source} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    try:
        return _Resolver(source, budget=len(data))(obj)
    except BestformerError:
        raise
    except (TypeError, ValueError, OverflowError) as err:  # e.g. an array used as a dict key (unhashable)
        raise FileFormatError(f"{source} is not a readable CIFAR pickle ({type(err).__name__})") from None
