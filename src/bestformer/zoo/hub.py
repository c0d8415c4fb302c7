"""Pretrained models in the Hugging Face Hub's folder layout (issue 17), offline first.

``save_pretrained(model, "dir")`` writes ``dir/config.json`` (the architecture: model name and options, library
version), ``dir/model.safetensors`` (1-bit weights as bits, see :mod:`.bits`; the header embedded in its metadata,
with the SHA-256 of the tensor data) and ``dir/README.md`` (a model card with the metrics and the command that
produced the weights). ``from_pretrained("dir")`` rebuilds the model; the header inside ``model.safetensors`` is the
truth, and a ``config.json`` that disagrees with it is refused, naming the key.

With the optional ``huggingface_hub`` package (``pip install bestformer[hub]``), ``from_pretrained("hf-hub:org/name")``
downloads the folder first and ``push_to_hub(model, "org/name")`` uploads one. These two need a network; the tests
run them against a mocked client only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, FileFormatError
from ..fileio import atomic_write_json, atomic_write_text
from ..training.checkpoint import (
    agreed_header,
    check_finite,
    check_model_header,
    checkpoint_header,
    load_into_model,
    read_sidecar,
)
from ..training.container import read_container, write_container
from ..version import __version__
from .bits import pack_state, unpack_state

PRETRAINED_FORMAT = "bestformer-pretrained"
PRETRAINED_VERSION = 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_PREFIX = "hf-hub:"
_META_KEY = "bestformer_pretrained"


def save_pretrained(model: nn.Module, directory: str | Path, *, card: str | None = None, **meta: Any) -> Path:
    """Write ``model`` into ``directory`` in the Hub's layout; ``meta`` (metrics, dataset, command, ...) goes into
    the header and ``config.json``; ``card`` replaces the generated model card. Returns the folder."""
    directory = Path(directory)
    tensors, packed = pack_state(model)
    header = {**checkpoint_header(model, **meta), "format": PRETRAINED_FORMAT,
              "format_version": PRETRAINED_VERSION, "packed": packed}
    # the old config goes first (as in save_checkpoint): a crash between the writes leaves weights that load with
    # their embedded header, never new weights beside an old config (refused as disagreeing)
    (directory / CONFIG).unlink(missing_ok=True)
    header = write_container(directory / WEIGHTS, tensors, _META_KEY, header)
    atomic_write_json(directory / CONFIG, header)
    atomic_write_text(directory / CARD, card if card is not None else model_card(header))
    return directory


def read_pretrained(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state dict, header)`` of a pretrained folder, checked (hash, format, config.json agreement, bits)."""
    directory = Path(directory)
    weights = directory / WEIGHTS
    if not directory.is_dir() or not weights.is_file():
        raise FileFormatError(f"{directory} is not a pretrained model folder (no {WEIGHTS}); expected the layout "
                              f"{CONFIG}, {WEIGHTS}, {CARD}")
    tensors, header = read_container(weights, _META_KEY, "pretrained weights")
    header = check_model_header(header, weights, PRETRAINED_FORMAT, PRETRAINED_VERSION, "pretrained model",
                                hashed_from=1)
    config = directory / CONFIG
    agreed_header(header, read_sidecar(config, "pretrained config"), config, weights, "pretrained config")
    state = unpack_state(tensors, header.get("packed", {}), str(weights))
    check_finite(state, weights, "pretrained weights")
    return state, header


def from_pretrained(spec: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Load a pretrained folder (or ``hf-hub:org/name``, downloaded with ``huggingface_hub``): ``(model in eval
    mode, header)``. ``overrides`` change model options that keep the weights' shapes (e.g. the neuron backend),
    and ``num_classes`` gives a new head on the trained body."""
    directory = _download(str(spec)[len(HUB_PREFIX):]) if str(spec).startswith(HUB_PREFIX) else Path(spec)
    state, header = read_pretrained(directory)
    return load_into_model(header, overrides, state, f"pretrained model {directory}"), header


def push_to_hub(model: nn.Module, repo_id: str, *, card: str | None = None, private: bool = False,
                token: str | None = None, **meta: Any) -> str:
    """Save ``model`` in the Hub's layout and upload it to ``repo_id`` (created when missing); returns the URL the
    client reports. Needs ``huggingface_hub`` and a network."""
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bestformer-push-") as tmp:
        save_pretrained(model, tmp, card=card, **meta)
        result = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                   commit_message=f"bestformer {__version__}: {model.model_name}")
    return str(result)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("the Hugging Face Hub needs the optional huggingface_hub package: pip install "
                          "'bestformer[hub]'") from None
    return huggingface_hub


def _download(repo_id: str) -> Path:
    if not repo_id or repo_id.count("/") != 1:
        raise ConfigError(f"expected {HUB_PREFIX}ORG/NAME, got {HUB_PREFIX}{repo_id}")
    return Path(_hub().snapshot_download(repo_id=repo_id, allow_patterns=[WEIGHTS, CONFIG, CARD]))


def model_card(header: dict[str, Any]) -> str:
    """A Hub model card (YAML front matter, then the model, its metrics and the command that trained it)."""
    meta = header.get("meta", {})
    dataset = meta.get("dataset", "unknown")
    lines = ["---", "library_name: bestformer", "tags:", "- spiking-neural-network", "- binary-neural-network",
             "- bestformer", f"datasets:\n- {dataset}", "---", "",
             f"# {meta.get('name', header['model_name'])}", "",
             f"`{header['model_name']}` trained by bestformer {header['library_version']} on "
             f"{dataset}.", ""]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in metrics.items()), ""]
    if meta.get("command"):
        lines += ["Reproduce:", "", "```", str(meta["command"]), "```", ""]
    lines += ["Load offline:", "", "```python", "import bestformer",
              "model, header = bestformer.from_pretrained(\"path/to/this/folder\")", "```", "",
              f"Model options: `{json.dumps(header['model_args'], sort_keys=True)}`", ""]
    return "\n".join(lines)
