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

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, FileFormatError
from .checkpoint import FileFormat, check_finite, check_fits
from .container import read_container, write_container
from .dist.collectives import all_reduce_sums

RESUME_FORMAT = "bestformer-resume"
#: 2: the header records the SHA-256 of the tensor data (format 1 files still load)
RESUME_VERSION = 2
RESUME_FILE = "resume.safetensors"
RESUME = FileFormat(RESUME_FORMAT, RESUME_VERSION, "bestformer_resume", "resume state")


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
        for i in range(torch.cuda.device_count()):  # by device number (sorted names put cuda.10 before cuda.2)
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
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
class EpochSums:
    """Running sums of one training epoch (saved in the resume state when a checkpoint falls mid-epoch)."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    grad_norm: float = 0.0
    grad_norm_max: float = 0.0
    grad_norm_steps: int = 0  # steps whose gradient norm is finite: a loss-scaler skip (fp16) has none
    steps: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float = 0.0

    def add_step(self, step: EpochSums) -> None:
        """Count a taken optimizer step's loss, correct predictions and samples (a skipped step's are dropped)."""
        self.loss += step.loss
        self.correct += step.correct
        self.count += step.count

    def add_norm(self, norm: float) -> None:
        """Count a step's gradient norm; a non-finite one (an fp16 step the loss scaler skips) is left out, so
        the epoch's mean norm is over the steps that had one."""
        if math.isfinite(norm):
            self.grad_norm += norm
            self.grad_norm_max = max(self.grad_norm_max, norm)
            self.grad_norm_steps += 1


#: the epoch sums that differ from rank to rank (each counts its own samples); the others are the same on all
PER_RANK_SUMS = ("loss", "correct", "count")


def global_epoch_sums(sums: dict[str, float], spikes: dict[str, tuple[int, int] | list[int]]
                      ) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """An epoch's sums and firing counts (``{layer: (spikes, positions)}``) added over all ranks, in one
    all-reduce (unchanged in a single process). Every rank must call it with the same layers."""
    flat = {k: sums[k] for k in PER_RANK_SUMS}
    flat.update({f"spikes\0{k}\0{i}": v[i] for k, v in spikes.items() for i in (0, 1)})
    total = all_reduce_sums(flat)
    return ({**sums, **{k: total[k] for k in PER_RANK_SUMS}},
            {k: (int(total[f"spikes\0{k}\0{0}"]), int(total[f"spikes\0{k}\0{1}"])) for k in spikes})


@dataclass
class Progress:
    """Where the run stands; stored as JSON in the resume state."""

    epoch: int = 0  # the epoch in progress (0-based)
    global_step: int = 0
    samples_seen: int = 0
    best_acc: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    skipped_total: int = 0
    finished: bool = False
    stopped_early: bool = False
    wall_s: float = 0.0  # wall-clock seconds of the run at the last save, over all its segments (resumes)
    history: list[dict[str, Any]] = field(default_factory=list)
    firing: list[dict[str, float]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=lambda: asdict(EpochSums()))
    spikes: dict[str, list[int]] = field(default_factory=dict)  # firing-rate counts of the epoch so far

    @classmethod
    def from_json(cls, saved: dict[str, Any], main: bool = True) -> Progress:
        """The progress stored in a resume state (the trainer's other keys, e.g. ``config``, left out). The
        interrupted epoch's sums and firing counts were saved added over all ranks: rank 0 alone carries them
        (``main``), the other ranks start from zero."""
        progress = cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        progress.sums.setdefault("grad_norm_steps", progress.sums.get("steps", 0))  # a state saved before the field
        if not main:
            progress.sums, progress.spikes = {**progress.sums, **dict.fromkeys(PER_RANK_SUMS, 0.0)}, {}
        return progress


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

    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                train_size: int, global_batch: int) -> None:
        """Load the weights, optimizer, loss scaler and RNG states into a trainer's parts, once checked to fit: the
        same training-split size and global batch (the position is counted in samples), the same tensors."""
        trained_on = self.progress.get("train_size")
        if trained_on != train_size:
            raise ConfigError(f"{self.path}: the run was trained on {trained_on} training samples, the training "
                              f"split now has {train_size}; resume with the same data")
        saved_batch = self.progress.get("global_batch", global_batch)
        if saved_batch != global_batch:
            raise ConfigError(f"{self.path}: the run was trained with global batch {saved_batch}, this trainer's is "
                              f"{global_batch} (batch size x accumulation x processes); resume with the same "
                              "global batch")
        check_fits(module, self.model, f"resume state {self.path}")
        try:
            optimizer.load_state_dict(self.optimizer)
            for param, st in optimizer.state.items():
                for key, t in st.items():
                    if torch.is_tensor(t) and t.dim() and t.shape != param.shape:
                        raise ValueError(f"optimizer {key} is {tuple(t.shape)} for a parameter {tuple(param.shape)}")
            if self.scaler is not None:
                scaler.load_state_dict(self.scaler)
            self.restore_rng()
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise FileFormatError(f"resume state {self.path} does not fit this run ({err})") from None
        module.load_state_dict(self.model)


def save_resume_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, progress: dict[str, Any]) -> Path:
    """Write the resume file atomically (a crash leaves the previous one intact)."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    rng_tensors, rng_meta = capture_rng()
    tensors.update(rng_tensors)
    header = RESUME.header(optimizer=opt_meta,
                           scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                           rng=rng_meta, progress=progress)
    write_container(path, tensors, RESUME.meta_key, header, default=_json_default)
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
    tensors, header = read_container(path, RESUME.meta_key, RESUME.what)
    header = RESUME.check(header, path)
    try:
        progress, opt_meta, rng_meta = header["progress"], header["optimizer"], header["rng"]
        if not (isinstance(progress, dict) and isinstance(opt_meta["state"], dict)
                and isinstance(opt_meta["param_groups"], list) and isinstance(rng_meta, dict)):
            raise TypeError("wrong section types")
        wall = progress.get("wall_s", 0.0)  # absent in resume files written before 0.2.0's cumulative clock
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 <= wall < math.inf:
            raise ValueError(f"progress wall_s is {wall!r}, expected a number of seconds >= 0")
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
