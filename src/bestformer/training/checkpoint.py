"""Model checkpoints: weights in safetensors plus a JSON sidecar that rebuilds the model on its own.

``save_checkpoint(model, "runs/x/best.safetensors", epoch=3)`` writes ``best.safetensors`` (weights, with the
header embedded as safetensors metadata, and the SHA-256 of the tensor data in it) and ``best.json`` (the same
header, readable). Every write is atomic. ``load_checkpoint(path)`` validates the file completely before
returning a model. The embedded header is the truth about the architecture: a sidecar that disagrees with it is
refused, naming the key. Before anything is allocated, the model the header describes is built on PyTorch's
``meta`` device (no memory) under a budget tied to the file's own size, and its tensor names, shapes and dtypes
must match the file's. A truncated or corrupt file, a wrong hash, non-finite weights, another architecture or a
newer format each give one :class:`FileFormatError`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BestformerError, FileFormatError
from ..fileio import atomic_write_json
from ..models import create_model, saved_model_args
from ..version import __version__
from .container import HASH_KEY, check_header, read_container, write_container

CHECKPOINT_FORMAT = "bestformer-checkpoint"
#: 2: the header records the SHA-256 of the tensor data (format 1 files, without it, still load)
CHECKPOINT_VERSION = 2
_META_KEY = "bestformer"


@dataclass(frozen=True)
class FileFormat:
    """One safetensors file format of this library (checkpoint, resume state): the one place that stamps its header
    (:meth:`header`) and validates it (:meth:`check`, through :func:`~.container.check_header`)."""

    name: str
    version: int
    meta_key: str  #: the safetensors metadata key holding the JSON header
    what: str  #: how errors name the file
    hashed_from: int = 2  #: headers from this version on record the SHA-256 of the tensor data

    def header(self, **fields: Any) -> dict[str, Any]:
        """The header of a file written now: format, version, library version, then ``fields``."""
        return {"format": self.name, "format_version": self.version, "library_version": __version__, **fields}

    def check(self, header: Any, path: Path) -> dict[str, Any]:
        """``header`` as a mapping of this format at a version this library reads; else :class:`FileFormatError`."""
        return check_header(header, path, self.name, self.version, self.what, self.hashed_from)


CHECKPOINT = FileFormat(CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _META_KEY, "checkpoint")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def checkpoint_header(model: nn.Module, **meta: Any) -> dict[str, Any]:
    """The description stored with the weights: format, library version, model name and options, ``meta``."""
    if not hasattr(model, "model_name"):
        raise BestformerError("only models built with bestformer.create_model can be checkpointed "
                              "(the checkpoint must name the architecture)")
    return CHECKPOINT.header(model_name=model.model_name,
                             model_args=json.loads(json.dumps(model.model_args, default=list)),
                             meta=json.loads(json.dumps(meta, default=str)))


def save_checkpoint(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Write ``model``'s weights and header atomically; returns the weights path."""
    path = Path(path)
    # the old sidecar goes first: a crash between the two writes leaves weights with their embedded header and no
    # sidecar (which loads), never new weights beside an old sidecar (which is refused as disagreeing)
    sidecar_path(path).unlink(missing_ok=True)
    header = write_container(path, model.state_dict(), _META_KEY, checkpoint_header(model, **meta))
    atomic_write_json(sidecar_path(path), header)
    return path


def check_model_header(header: Any, path: Path, fmt: str, version: int, what: str, hashed_from: int
                       ) -> dict[str, Any]:
    """:func:`~.container.check_header`, plus what rebuilds a model: ``model_name``, ``model_args``, ``meta``."""
    header = check_header(header, path, fmt, version, what, hashed_from)
    if not isinstance(header.get("model_name"), str) or not isinstance(header.get("model_args"), dict):
        raise FileFormatError(f"{path}: {what} header lacks model_name/model_args")
    if not isinstance(header.get("meta", {}), dict):
        raise FileFormatError(f"{path}: {what} header's meta is not a mapping")
    return header


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted key at which two JSON values first differ (``None`` when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}{key}"
            found = first_difference(a[key], b[key], f"{where}{key}.")
            if found is not None:
                return found
        return None
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # as written (NaN equals NaN)
    return None if same else where.rstrip(".") or "(the whole header)"


def _lookup(header: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(header, dict) or key not in header:
            return "(absent)"
        header = header[key]
    return header


def read_sidecar(side: Path, what: str) -> Any:
    """The JSON header written beside a weights file (``None`` when there is none); unreadable or corrupt: one
    :class:`FileFormatError`."""
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except OSError as err:
        raise FileFormatError(f"cannot read {what} {side}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FileFormatError(f"{what} {side} is corrupt ({err})") from None


def agreed_header(header: Any, sidecar: Any, side: Path, weights: Path, what: str) -> Any:
    """The header embedded in ``weights``, which is authoritative: a ``sidecar`` that says anything else is refused,
    naming the first differing key (an edited sidecar, or one copied from another run). Without an embedded header
    the sidecar is all there is."""
    if sidecar is None:
        return header
    if header is None:
        return sidecar
    key = first_difference(header, sidecar)
    if key is not None:
        raise FileFormatError(
            f"{what} {side} disagrees with the header embedded in {weights.name} on {key!r} "
            f"({_lookup(sidecar, key)!r} in the sidecar, {_lookup(header, key)!r} in the weights file); "
            f"the weights were saved with the embedded one: delete {side.name} or restore it")
    return header


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate weights and header. The header embedded in the weights file is authoritative; the JSON
    sidecar, when present, must say exactly the same (a sidecar edited or copied from another run is refused)."""
    path = Path(path)
    side = sidecar_path(path)
    sidecar = read_sidecar(side, "checkpoint sidecar")
    expected = sidecar.get(HASH_KEY) if isinstance(sidecar, dict) and isinstance(sidecar.get(HASH_KEY), str) else None
    state, header = read_container(path, _META_KEY, expected_sha256=expected)
    header = agreed_header(header, sidecar, side, path, "checkpoint sidecar")
    header = check_model_header(header, path, CHECKPOINT.name, CHECKPOINT.version, CHECKPOINT.what,
                                CHECKPOINT.hashed_from)
    check_finite(state, path)
    return state, header


def check_finite(state: dict[str, torch.Tensor], path: Path, what: str = "checkpoint") -> None:
    """Refuse NaN / inf in any floating-point tensor."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{what} {path} has non-finite values (NaN/inf) in {key!r}")


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into an existing ``model`` after checking it is the same architecture;
    returns the header. Nothing is loaded unless everything matches."""
    path = Path(path)
    state, header = read_checkpoint(path)
    mine = getattr(model, "model_name", None)
    if mine is not None and header["model_name"] != mine:
        raise FileFormatError(f"checkpoint {path} holds {header['model_name']!r}, not {mine!r}")
    check_fits(model, state, f"checkpoint {path} ({header['model_name']} {header['model_args']})")
    model.load_state_dict(state)
    return header


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`FileFormatError` (naming ``what``) unless ``state`` has exactly the model's tensors, shapes and
    dtypes (``load_state_dict`` would otherwise cast, e.g. float data relabelled as int32 in the file's header)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    cast = sorted(k for k in own.keys() & state.keys() if own[k].dtype != state[k].dtype)
    if missing or extra or bad or cast:
        detail = []
        if bad:
            k = sorted(bad)[0]
            detail.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        if cast:
            k = cast[0]
            detail.append(f"{k} is stored as {state[k].dtype} in the file, the model holds {own[k].dtype}")
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        raise FileFormatError(f"{what} does not fit this model: " + "; ".join(detail))


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def _construction_budget(elements: int, modules: int) -> Iterator[None]:
    """While active, building more than ``elements`` tensor elements or ``modules`` modules in this thread raises
    ``_TooLarge`` (an architecture option such as ``depth=10**9`` would otherwise loop or allocate until memory runs
    out). torch's registration hooks see every thread's modules: those of other threads are not counted (two
    threads loading checkpoints failed each other's budgets)."""
    from torch.nn.modules import module as nn_module

    count = {"elements": 0, "modules": 0}
    owner = threading.get_ident()

    def on_tensor(_module: nn.Module, _name: str, tensor: torch.Tensor | None) -> None:
        if threading.get_ident() != owner:
            return
        count["elements"] += 0 if tensor is None else tensor.numel()
        if count["elements"] > elements:
            raise _TooLarge(f"more than {elements:,} weight elements")

    def on_module(_module: nn.Module, _name: str, _sub: nn.Module | None) -> None:
        if threading.get_ident() != owner:
            return
        count["modules"] += 1
        if count["modules"] > modules:
            raise _TooLarge(f"more than {modules:,} modules")

    handles = [nn_module.register_module_parameter_registration_hook(on_tensor),
               nn_module.register_module_buffer_registration_hook(on_tensor),
               nn_module.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_for_state(header: dict[str, Any], overrides: dict[str, Any], state: dict[str, torch.Tensor], what: str
                    ) -> nn.Module:
    """Build the model a checkpoint ``header`` names (its options as saved, :func:`saved_model_args`, plus
    ``overrides``) for the weights ``state`` only once it is known to fit them: first on the ``meta`` device
    (nothing allocated) under a budget of a few times the file's own size, then for real."""
    name = header["model_name"]
    saved = saved_model_args(name, header["model_args"], header.get("library_version"))
    args = {**saved, **overrides}
    held = sum(t.numel() for t in state.values())
    budget = (4 * held + 2**20, 16 * len(state) + 4096)

    def build_shape(options: dict[str, Any]) -> nn.Module:
        try:
            with _construction_budget(*budget), torch.device("meta"):
                return create_model(name, **options)
        except (NotImplementedError, RuntimeError) as err:
            if "meta" not in str(err):
                raise
            # a model that reads values while it is built (e.g. a converted CSDformer's thresholds) cannot be built
            # on "meta": build it for real, still under the budget (tensors are counted as they are registered)
            with _construction_budget(*budget):
                return create_model(name, **options)

    try:
        shape_model = build_shape(args)
    except _TooLarge as err:
        raise FileFormatError(f"{what} describes a model far larger than the {held:,} values the file holds "
                              f"({err}); its options {args} are damaged") from None
    except BestformerError as err:
        if overrides and _builds(build_shape, saved):  # the caller's options are wrong, not the file
            raise
        raise FileFormatError(f"{what} names a model this library cannot build: {err}") from None
    except (TypeError, ValueError, ArithmeticError, RecursionError, RuntimeError) as err:  # a damaged header's
        raise FileFormatError(f"{what} has invalid model options {args}: {err}") from None
    check_fits(shape_model, state, what)
    if next(iter(shape_model.state_dict().values()), torch.empty(0)).is_meta:
        return create_model(name, **args)
    return shape_model


def load_into_model(header: dict[str, Any], overrides: dict[str, Any], state: dict[str, torch.Tensor], what: str
                    ) -> nn.Module:
    """The model of ``header`` (plus ``overrides``) with the weights ``state`` loaded, in eval mode. A
    ``num_classes`` override other than the saved one keeps the trained body and gives a new head (timm's
    ``pretrained=True, num_classes=N``: fine-tuning to another label set). A file whose weights already have
    ``num_classes`` outputs (saved after ``reset_classifier`` by versions that did not record it) loads as it is."""
    try:
        model, num_classes = build_for_state(header, overrides, state, what), None
    except FileFormatError:  # a file of the saved head (a new label set asked for), or a damaged file
        num_classes = overrides.get("num_classes")
        if num_classes is None:
            raise
        model = build_for_state(header, {k: v for k, v in overrides.items() if k != "num_classes"}, state, what)
    model.load_state_dict(state)
    if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
        model.reset_classifier(num_classes)
    return model.eval()


def _builds(build: Callable[[dict[str, Any]], nn.Module], options: dict[str, Any]) -> bool:
    """Whether ``build(options)`` succeeds (the saved options alone, to tell whose options failed)."""
    try:
        build(options)
    except (BestformerError, _TooLarge, TypeError, ValueError, ArithmeticError, RecursionError, RuntimeError):
        return False
    return True


def load_checkpoint(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the checkpoint (with its options, plus ``overrides``) and load its weights.

    Returns ``(model, meta)`` where ``meta`` is the ``**meta`` given to :func:`save_checkpoint` plus
    ``model_name``, ``model_args`` and ``library_version``. The model is in eval mode.
    """
    path = Path(path)
    state, header = read_checkpoint(path)
    model = load_into_model(header, overrides, state, f"checkpoint {path}")
    meta = dict(header.get("meta", {}))
    meta.update(model_name=header["model_name"], model_args=header["model_args"],
                library_version=header.get("library_version"))
    return model, meta
