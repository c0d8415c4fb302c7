"""Model checkpoints: weights in safetensors plus a JSON sidecar that rebuilds the model on its own.

``save_checkpoint(model, "runs/x/best.safetensors", epoch=3)`` writes ``best.safetensors`` (weights, with the
header embedded as safetensors metadata) and ``best.json`` (the same header, readable). Every write is atomic.
``load_checkpoint(path)`` validates the file completely before returning a model: a truncated or corrupt
file, non-finite weights, another architecture or a newer format each give one :class:`FileFormatError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..errors import BestformerError, FileFormatError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..models import create_model

CHECKPOINT_FORMAT = "bestformer-checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "bestformer"


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def checkpoint_header(model: nn.Module, **meta: Any) -> dict[str, Any]:
    """The description stored with the weights: format, library version, model name and options, ``meta``."""
    if not hasattr(model, "model_name"):
        raise BestformerError("only models built with bestformer.create_model can be checkpointed "
                              "(the checkpoint must name the architecture)")
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "library_version": __version__,
        "model_name": model.model_name,
        "model_args": json.loads(json.dumps(model.model_args, default=list)),
        "meta": json.loads(json.dumps(meta, default=str)),
    }


def save_checkpoint(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Write ``model``'s weights and header atomically; returns the weights path."""
    path = Path(path)
    header = checkpoint_header(model, **meta)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(state, metadata={_META_KEY: json.dumps(header)}))
    atomic_write_json(sidecar_path(path), header)
    return path


def _check_header(header: Any, path: Path) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a bestformer checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FileFormatError(f"{path}: invalid checkpoint format_version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise FileFormatError(
            f"{path} was written by a newer bestformer (checkpoint format {version}, library "
            f"{header.get('library_version')}); this version {__version__} reads format <= {CHECKPOINT_VERSION}: "
            "upgrade bestformer"
        )
    if not isinstance(header.get("model_name"), str) or not isinstance(header.get("model_args"), dict):
        raise FileFormatError(f"{path}: checkpoint header lacks model_name/model_args")
    if not isinstance(header.get("meta", {}), dict):
        raise FileFormatError(f"{path}: checkpoint header's meta is not a mapping")
    return header


def read_safetensors(path: str | Path, meta_key: str, what: str = "checkpoint"
                     ) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors of a safetensors file and the JSON value stored under ``meta_key`` in its metadata (``None``
    when absent); a missing, truncated or corrupt file gives one :class:`FileFormatError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        state = st_load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        embedded = json.loads(meta.get(meta_key, "null"))
    except (SafetensorError, ValueError, TypeError, UnicodeDecodeError, AttributeError, RecursionError) as err:
        raise FileFormatError(f"{what} {path} is truncated or corrupt ({err})") from None
    return state, embedded


def check_finite(state: dict[str, torch.Tensor], path: Path, what: str = "checkpoint") -> None:
    """Refuse NaN / inf in any floating-point tensor."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{what} {path} has non-finite values (NaN/inf) in {key!r}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate weights and header (the sidecar when present, else the embedded copy)."""
    path = Path(path)
    state, header = read_safetensors(path, _META_KEY)
    side = sidecar_path(path)
    if side.is_file():
        try:
            header = json.loads(side.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise FileFormatError(f"checkpoint sidecar {side} is corrupt ({err})") from None
    header = _check_header(header, path)
    check_finite(state, path)
    return state, header


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
    """Raise :class:`FileFormatError` (naming ``what``) unless ``state`` has exactly the model's tensors and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or extra or bad:
        detail = []
        if bad:
            k = sorted(bad)[0]
            detail.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        raise FileFormatError(f"{what} does not fit this model: " + "; ".join(detail))


def load_checkpoint(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the checkpoint (with its options, plus ``overrides``) and load its weights.

    Returns ``(model, meta)`` where ``meta`` is the ``**meta`` given to :func:`save_checkpoint` plus
    ``model_name``, ``model_args`` and ``library_version``. The model is in eval mode.
    """
    path = Path(path)
    _, header = read_checkpoint(path)
    args = {**header["model_args"], **overrides}
    try:
        model = create_model(header["model_name"], **args)
    except BestformerError as err:
        raise FileFormatError(f"checkpoint {path} names a model this library cannot build: {err}") from None
    except (TypeError, ValueError, ArithmeticError, RecursionError) as err:  # options of a damaged header
        raise FileFormatError(f"checkpoint {path} has invalid model options {args}: {err}") from None
    load_weights(model, path)
    model.eval()
    meta = dict(header.get("meta", {}))
    meta.update(model_name=header["model_name"], model_args=header["model_args"],
                library_version=header.get("library_version"))
    return model, meta


