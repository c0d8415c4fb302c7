"""``profile_model``: size, MACs, SOPs, energy, NS-ACE, firing rates and representation of one model, measured
on real batches (or synthetic input, labelled so), as one :class:`Profile`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FileFormatError, InputError
from ..layers.deploy_form import deployment_form, has_deploy_form
from ..layers.modes import eval_mode
from ..models import get_input_config
from ..progress import progress_bar
from .energy import EnergyModel, get_energy_model
from .ops import OpCounter, batch_size_of
from .precision import FP_BITS
from .report import Profile
from .representation import RepresentationProbe
from .size import model_size

SYNTHETIC = "synthetic"


# ------------------------------------------------------------------------------------------------------ inputs
def _input_shape(model: nn.Module) -> tuple[int, int]:
    """``(in_channels, img_size)`` from the model, or from its registered input config."""
    channels, size = getattr(model, "in_channels", None), getattr(model, "img_size", None)
    if channels is None or size is None:
        name = getattr(model, "model_name", None)
        if name is None:
            raise ConfigError("synthetic input needs a model with in_channels and img_size (or a registered model)")
        cfg = get_input_config(name)
        channels, size = cfg.in_channels, cfg.img_size
    return int(channels), int(size)


def _synthetic_batches(model: nn.Module, batches: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Uniform random images in ``[0, 1)`` of the model's input shape (repeated over ``T`` by the model)."""
    channels, size = _input_shape(model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        yield torch.rand(batch_size, channels, size, size, generator=gen)


def _dataset_batches(model: nn.Module, dataset: str | None, data_dir: str | Path | None, batches: int,
                     batch_size: int) -> tuple[Iterator[Tensor], str]:
    """Batches of the held-out split of ``dataset`` (default: the registered model's dataset)."""
    if dataset is None:
        name = getattr(model, "model_name", None)
        if name is None:
            raise ConfigError("profiling on real data needs dataset=... for a model that is not a registered one")
        dataset = get_input_config(name).dataset
    from ..data import build_datasets  # only when real data is asked for
    time_steps = getattr(model, "time_steps", None)
    options: dict[str, Any] = {"limit": batches * batch_size}
    if time_steps is not None:
        options["time_steps"] = int(time_steps)  # event datasets are binned into the model's T frames
    try:
        data = build_datasets(dataset, data_dir, **options)
    except FileFormatError as err:
        raise FileFormatError(f"{err} (or profile on synthetic input: synthetic=True, --synthetic)") from None
    return _bundle_batches(data, batch_size)


def _bundle_batches(data: Any, batch_size: int) -> tuple[Iterator[Tensor], str]:
    """Batches of a dataset bundle's held-out split: validation, else test, else train."""
    from ..data import time_first

    split_name, split = next(((n, getattr(data, n)) for n in ("val", "test", "train")
                              if getattr(data, n, None) is not None), (None, None))
    if split is None:
        raise InputError(f"dataset {data.name!r} has no split to profile on")
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False)

    def gen() -> Iterator[Tensor]:
        for x, _ in loader:
            yield time_first(x)  # event frames [B, T, ...] -> [T, B, ...]; images unchanged

    return gen(), f"{data.name} ({split_name})"


def _given_batches(inputs: Tensor | Iterable[Any]) -> Iterator[Tensor]:
    from ..data import time_first  # as in _dataset_batches: the data package only when profiling runs

    if isinstance(inputs, Tensor):
        yield inputs
        return
    for item in inputs:
        pair = isinstance(item, (tuple, list))
        x = item[0] if pair else item
        if not isinstance(x, Tensor):
            raise InputError(f"profile inputs must yield tensors or (tensor, label) pairs, got {type(x).__name__}")
        # a pair is a DataLoader's batch (event frames [B, T, ...]); a bare tensor is already the model's input
        yield time_first(x) if pair else x


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------- profile
def profile_model(model: nn.Module, inputs: Tensor | Iterable[Any] | None = None, batches: int = 4,
                  energy: str | EnergyModel = "45nm", synthetic: bool = False, *, dataset: str | None = None,
                  data_dir: str | Path | None = None, batch_size: int = 16, fp_bits: int = FP_BITS,
                  representation: bool = False, blocks: list[str] | None = None, deploy: bool = True,
                  measured_on: str | None = None, seed: int = 0, progress: bool = True, data: Any = None) -> Profile:
    """Profile ``model`` on up to ``batches`` batches.

    Args:
        inputs: a tensor (one batch), or an iterable / DataLoader of tensors or ``(tensor, label)`` pairs. A
            tensor is the model's input as it is (event frames ``[T, B, C, H, W]``); a pair is a DataLoader's
            batch, whose event frames ``[B, T, C, H, W]`` are put time first, as training does.
            ``None``: the held-out split of ``dataset`` (default: the registered model's own dataset) read by
            ``bestformer.data.build_datasets`` from ``data_dir``; or random input with ``synthetic=True``.
        data: a dataset bundle (:func:`bestformer.data.build_datasets`) to measure on its held-out split instead
            of reading ``dataset``: e.g. a saved model's own carve and event binning
            (:func:`bestformer.training.saved.saved_model_data`), as ``bestformer profile CKPT`` does.
        energy: ``"45nm"`` (E_MAC 4.6 pJ, E_AC 0.9 pJ), ``"fp16"``, ``"int8"`` or an :class:`EnergyModel`.
        batch_size: batch size of synthetic and dataset input.
        fp_bits: bits of a full-precision weight in NS-ACE and in a full-precision model's size (16, the papers'
            tables: :mod:`~bestformer.analysis.precision`).
        representation: also measure the encoder blocks' value-set size and entropy (Fig. 2 / 5b).
        blocks: module names of the encoder blocks (default: those of ``model.blocks`` or ``model.stages``).
        deploy: also measure the deployment file (``bestformer.deploy``) when available.
        measured_on: label of ``inputs`` in the output (default ``"inputs"``).

    Products, SOPs, energy and NS-ACE are counted on the model's deployment form
    (:func:`bestformer.layers.deploy_form.deployment_form`: a copy with its re-parameterised convolutions
    folded, e.g. QSD-Transformer's ``RepConvBN`` and ``SepConv``), so each operation is charged by the operand
    types it has at deployment; size is that of ``model``. A model without such layers is counted as it is.
    The model runs in eval mode without gradients; its training flag is restored afterwards.
    """
    _positive("batches", batches)
    _positive("batch_size", batch_size)
    _positive("fp_bits", fp_bits)
    energy_model = get_energy_model(energy)
    if sum((synthetic, inputs is not None, data is not None)) > 1:
        raise ConfigError("pass one of inputs, data or synthetic=True")
    if data is not None:
        stream, label = _bundle_batches(data, batch_size)
    elif synthetic:
        stream, label = _synthetic_batches(model, batches, batch_size, seed), SYNTHETIC
    elif inputs is not None:
        stream, label = _given_batches(inputs), measured_on or "inputs"
    else:
        stream, label = _dataset_batches(model, dataset, data_dir, batches, batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counted = deployment_form(model) if has_deploy_form(model) else model
    probe = RepresentationProbe(counted, blocks) if representation else None
    with eval_mode(counted), OpCounter(counted, fp_bits=fp_bits) as counter, probe or contextlib.nullcontext():
        for x in progress_bar(islice(stream, batches), total=batches, desc="profile", unit="batch",
                              disable=None if progress else True):
            x = x.to(device)
            if probe is not None:
                probe.set_batch(batch_size_of(x))
            counter.run(x)
    if counter.samples == 0:
        raise InputError("no input batches to profile (the inputs or the dataset split are empty)")
    return Profile(
        model_name=getattr(model, "model_name", type(model).__name__),
        size=model_size(model, deploy=deploy, fp_bits=fp_bits),
        layers=counter.op_stats(),
        neurons=counter.neuron_stats(),
        energy_model=energy_model,
        fp_bits=fp_bits,
        firing_rates_measured_on=label,
        samples=counter.samples,
        time_steps=getattr(model, "time_steps", None),
        representation=probe.results() if probe is not None else None,
    )
