"""The model zoo (issue 17): pretrained 1-bit spiking transformers (and the ANN teachers they were distilled
from) that ship inside the package and load with no network.

    bestformer.list_pretrained()                                  # the entries, as dicts (``bestformer zoo``)
    model = bestformer.create_model("bestformer_tiny", pretrained="mnist")     # or pretrained=True: the default tag
    model, header = bestformer.load_pretrained("bestformer_tiny.mnist")

Each entry is a folder in the Hugging Face layout (:mod:`.hub`) under ``bestformer/zoo/weights/<name>/``, with the
training run's ``metrics.csv``, ``train_config.yaml`` and ``train.log`` beside it. ``manifest.json`` lists the
entries: model, tag, dataset, top-1 and on which split, the size in the paper's convention and on disk, the
training wall-clock and CPU, the exact command that produced it, a fixed data slice with its exact accuracy (for the
tests), and the SHA-256 of each weights file, checked on every load. ``benchmarks/zoo.py`` builds it from training
runs; docs/zoo.md says how to add an entry.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, FileFormatError, close_matches
from .hub import WEIGHTS, from_pretrained, push_to_hub, read_pretrained, save_pretrained

ZOO_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = Path(__file__).resolve().parent / "manifest.json"
ZOO_PREFIX = "zoo:"

__all__ = ["MANIFEST", "ZOO_DIR", "ZOO_PREFIX", "create_model", "entry_folder", "from_pretrained", "get_entry",
           "list_models", "list_pretrained", "load_pretrained", "markdown_table", "push_to_hub", "read_pretrained",
           "save_pretrained", "slice_accuracy"]


@cache
def _manifest() -> tuple[dict[str, Any], ...]:
    if not MANIFEST.is_file():
        return ()
    try:
        entries = json.loads(MANIFEST.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileFormatError(f"the zoo manifest {MANIFEST} is unreadable ({err}); reinstall bestformer") from None
    return tuple(entries)


def list_pretrained(pattern: str = "*") -> list[dict[str, Any]]:
    """The zoo's entries whose name matches ``pattern`` (fnmatch), each a dict with at least ``name``, ``model``,
    ``tag``, ``dataset``, ``split``, ``top1`` and ``file``."""
    return [copy.deepcopy(e) for e in _manifest() if fnmatch.fnmatchcase(e["name"], pattern)]  # not the cache's


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """:func:`bestformer.models.list_models`; with ``pretrained`` (timm's switch) the zoo's ``model.tag`` names
    whose name or model matches ``pattern`` (``"bestformer_tiny"`` lists its tags), each loadable by
    ``create_model(name, pretrained=True)``."""
    from ..models import list_models as registered

    if not isinstance(pretrained, bool):
        raise ConfigError(f"pretrained must be True or False, got {pretrained!r}")
    if not pretrained:
        return registered(pattern)
    return sorted(e["name"] for e in _manifest() if fnmatch.fnmatchcase(e["name"], pattern)
                  or fnmatch.fnmatchcase(e["model"], pattern))


def get_entry(name: str) -> dict[str, Any]:
    """The entry named ``name`` (``model.tag``, e.g. ``bestformer_tiny.mnist``; ``zoo:`` prefix allowed)."""
    name = name.removeprefix(ZOO_PREFIX)
    for entry in _manifest():
        if entry["name"] == name:
            return copy.deepcopy(entry)
    names = [e["name"] for e in _manifest()]
    raise ConfigError(f"no zoo entry {name!r}{close_matches(name, names)}; `bestformer zoo` lists "
                      f"{len(names)}: {', '.join(names)}")


def _resolve(model: str, tag: str | bool) -> dict[str, Any]:
    if tag is True:
        defaults = [e for e in _manifest() if e["model"] == model and e.get("default")]
        if not defaults:
            tags = [e["tag"] for e in _manifest() if e["model"] == model]
            raise ConfigError(f"no pretrained weights for {model!r} in the zoo" + (f" (tags: {', '.join(tags)})"
                                                                               if tags else ""))
        return dict(defaults[0])
    return get_entry(f"{model}.{tag}")


def entry_folder(entry: dict[str, Any]) -> Path:
    return ZOO_DIR / entry["name"]


def load_pretrained(name: str, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Load zoo entry ``name`` after checking its weights file against the manifest's SHA-256: ``(model in eval
    mode, header)``; the header's ``meta`` holds the training run's config, metrics and command."""
    entry = get_entry(name)
    folder = entry_folder(entry)
    weights = folder / WEIGHTS
    try:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    except OSError as err:
        raise FileFormatError(f"zoo entry {entry['name']}: cannot read {weights} ({err.strerror or err}); "
                              "reinstall bestformer") from None
    if digest != entry["sha256"]:
        raise FileFormatError(f"zoo entry {entry['name']}: {weights} has SHA-256 {digest[:16]}..., the manifest "
                              f"records {entry['sha256'][:16]}...: the file is damaged or was replaced; reinstall "
                              "bestformer")
    return from_pretrained(folder, **overrides)


def create_model(name: str, pretrained: bool | str | None = False, **overrides: Any) -> nn.Module:
    """:func:`bestformer.models.create_model`, plus ``pretrained``: ``True`` (the model's default zoo entry) or a
    tag (``"mnist"``) loads the zoo's weights (in eval mode; call ``.train()`` to fine-tune). As in timm, ``name``
    may carry the tag (``"bestformer_tiny.mnist"``): ``pretrained=True`` then loads that entry, and without
    ``pretrained`` the tag is ignored (the architecture, untrained)."""
    from ..models import create_model as build
    from ..models import is_model

    pretrained = False if pretrained is None else pretrained  # an argparse default, say
    if not isinstance(pretrained, (bool, str)) or pretrained == "":
        raise ConfigError(f"pretrained must be True, False (or None) or a tag, got {pretrained!r}")
    model, dot, tag = name.partition(".")
    if dot and not is_model(name) and is_model(model):  # "model.tag", timm's convention
        if isinstance(pretrained, str) and pretrained != tag:
            raise ConfigError(f"{name!r} names the tag {tag!r} but pretrained={pretrained!r}: give the tag once")
        name, pretrained = model, tag if pretrained else False
    if not pretrained:
        return build(name, **overrides)
    return load_pretrained(_resolve(name, pretrained)["name"], **overrides)[0]


def slice_accuracy(name: str | Path, data_dir: str | None, split: str, limit: int, batch_size: int = 100
                   ) -> tuple[int, float]:
    """``(samples, top-1 %)`` of zoo entry ``name`` (or of a folder written by :func:`save_pretrained`: an entry
    being built, not in the manifest yet) on the first ``limit`` samples of ``split`` (the carve of its training
    run's seed), computed in float64 with the reference neurons: rounding differences between CPUs' float32
    kernels, which can move a membrane across its threshold, are then ~1e-16 instead of ~1e-7, so the number is the
    same on every machine. This is the manifest's ``slice`` (what the tests re-check exactly)."""
    import torch

    from ..data import time_first
    from ..neurons import use_backend
    from ..training.saved import saved_model_data

    model, header = from_pretrained(name) if isinstance(name, Path) else load_pretrained(name)
    data = getattr(saved_model_data(model, header["meta"], source=f"zoo entry {name}", data_dir=data_dir,
                                    limit=limit), split)
    model = model.double()
    correct = 0
    with torch.no_grad(), use_backend("plain"):  # the compiled kernels are float32 only
        for lo in range(0, len(data), batch_size):
            xs, ys = zip(*(data[i] for i in range(lo, min(lo + batch_size, len(data)))), strict=True)
            x = time_first(torch.stack([torch.as_tensor(v) for v in xs]).double())
            correct += int((model(x).argmax(1) == torch.as_tensor(ys)).sum())
    return len(data), 100.0 * correct / len(data)


def markdown_table(entries: list[dict[str, Any]] | None = None) -> str:
    """The zoo as a Markdown table (the README's; a test checks that the README holds exactly this)."""
    lines = ["| entry | dataset | top-1 | split (samples) | 1-bit weights | size (paper) | file | trained |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in list_pretrained() if entries is None else entries:
        share = f"{e['binary_params'] / e['params']:.0%}" if e["params"] else "-"
        lines.append(f"| `{e['name']}` | {e['dataset']} | {e['top1']:.2f} % | {e['split']} ({e['count']:,}) | "
                     f"{share} | {e['paper_bytes'] / 1e3:.1f} kB | {e['file_bytes'] / 1e3:.1f} kB | "
                     f"{e['train_minutes']:.1f} min |")
    return "\n".join(lines)
