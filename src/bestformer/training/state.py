"""Resume state of a training run: everything needed to continue exactly where a run stopped.

One safetensors file (``runs/<name>/resume.safetensors``, written atomically beside ``last.safetensors``)
holds the model weights, the optimizer's tensors and the torch / CUDA / numpy RNG states; its metadata holds
the rest as JSON: the resolved config, the position (epoch, optimizer step, samples seen), the best
validation result, the metrics history, the partial sums of an interrupted epoch, the optimizer's
hyper-parameters, the loss scaler and Python's RNG state. Because the weights are inside, the file is
self-consistent whatever moment a crash happens at; no pickle is involved, so reading an untrusted or
damaged file can only give a :class:`~bestformer.errors.FileFormatError`.

The learning-rate schedule is a function of the step (:mod:`.schedule`) and the data order and augmentation
are functions of ``(seed, epoch, step)``, so the position restores them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import FileFormatError
from .checkpoint import check_finite
from .container import check_header, read_container, write_container

RESUME_FORMAT = "bestformer-resume"
#: 2: the header records the SHA-256 of the tensor data (format 1 files still load)
RESUME_VERSION = 2
RESUME_FILE = "resume.safetensors"
_META_KEY = "bestformer_resume"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python, as ``(tensors, json)``."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), py_gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only for the devices present)."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        plain = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                plain[k] = v
        state_meta[str(idx)] = plain
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(plain) for i, plain in meta["state"].items()}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class ResumeState:
    """A loaded resume file: ``model`` / ``optimizer`` / ``scaler`` state dicts, RNG states, and ``progress``
    (the JSON the trainer stored: position, best result, history, partial epoch sums, config)."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]
    progress: dict[str, Any]

    def restore_rng(self) -> None:
        restore_rng(self.rng_tensors, self.rng_meta)


def save_resume_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, progress: dict[str, Any]) -> Path:
    """Write the resume file atomically (a crash leaves the previous one intact)."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    rng_tensors, rng_meta = capture_rng()
    tensors.update(rng_tensors)
    header = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_VERSION,
        "library_version": __version__,
        "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_meta,
        "progress": progress,
    }
    write_container(path, tensors, _META_KEY, header, default=_json_default)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a resume file")


def load_resume_state(path: str | Path) -> ResumeState:
    """Read and validate a resume file; any damage gives one :class:`FileFormatError` naming the file."""
    path = Path(path)
    tensors, header = read_container(path, _META_KEY, "resume state")
    header = check_header(header, path, RESUME_FORMAT, RESUME_VERSION, "resume state", hashed_from=2)
    try:
        progress, opt_meta, rng_meta = header["progress"], header["optimizer"], header["rng"]
        if not (isinstance(progress, dict) and isinstance(opt_meta["state"], dict)
                and isinstance(opt_meta["param_groups"], list) and isinstance(rng_meta, dict)):
            raise TypeError("wrong section types")
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        optimizer = _join_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, opt_meta)
        rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        if "rng.torch" not in rng_tensors or "rng.numpy" not in rng_tensors:
            raise KeyError("RNG states")
        scaler = header.get("scaler")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FileFormatError(f"resume state {path} is incomplete or corrupt ({err})") from None
    check_finite(model, path, "resume state")
    return ResumeState(path, model, optimizer, scaler, rng_tensors, rng_meta, progress)
