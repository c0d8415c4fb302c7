"""The training jobs: :func:`train` starts a run, :func:`resume` continues one (``bestformer train``).

Under torchrun every process runs the same code (ours, docs/distributed.md): both join the process group of
torchrun's environment and leave it at the end and on error; rank 0 names the run folder (broadcast) and is the
only writer; a teacher named by architecture is trained first by all ranks together, the same distributed way as
the student (no rank idles, and no rank waits at a collective for hours while rank 0 trains alone, which the
collective timeout would end), then rank 0 reads its best weights and broadcasts them; a resumed run keeps its
global batch on another number of processes (:func:`~bestformer.training.dist.replan_batches`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import read_json
from ..training.config import TrainConfig, check_run_name, implied_recipe, load_recipe
from ..training.dist import DistContext, broadcast_object
from ..training.result import TrainResult
from ..training.runs import RunFolder, default_run_name, resolve_run_folder
from ..training.state import load_resume_state
from .config import check_resume_length, resumed_config
from .ranks import locked, session
from .run import Run


def train(cfg: TrainConfig, *, recipe: str | None = None, ctx: DistContext | None = None) -> TrainResult:
    """Start a new run in ``cfg.out / cfg.name`` (a folder that already holds a checkpoint is refused:
    resume it instead). Under torchrun (no ``ctx`` given) every process calls it; they join the process group,
    rank 0 names the run folder and writes it."""
    with session(cfg, ctx) as ctx:
        # the default name is made of --model and --dataset: checked before anything is created from it
        name = check_run_name(broadcast_object(cfg.name or default_run_name(cfg.model, cfg.dataset)))
        folder = RunFolder(Path(cfg.out) / name, enabled=ctx.is_main)
        with locked(folder, ctx):
            if broadcast_object(folder.has_checkpoint()):
                raise ConfigError(f"run folder {folder.path} already holds a checkpoint: continue it with --resume "
                                  f"{folder.path}, or choose another --name")
            if cfg.name is None:
                cfg = cfg.replace(name=name)
            return Run(cfg, folder, ctx, recipe).execute()


def resume(spec: str | os.PathLike[str], out: str | os.PathLike[str] = "runs", *, ctx: DistContext | None = None,
           recipe: str | None = None, **overrides: Any) -> TrainResult:
    """Continue the run ``spec`` (a run folder, a file in it, or ``"last"``) exactly where its last complete
    checkpoint left it. ``overrides`` (and ``recipe``: the original command's ``--recipe``) may repeat the run's
    own options; only the options in :data:`~.config.RESUMABLE` may take another value. A folder without a
    checkpoint yet (a run killed during start-up) starts from the beginning with its saved config."""
    folder = resolve_run_folder(spec, out)
    progress = load_resume_state(folder.resume_path).progress if folder.has_checkpoint() else None
    saved = progress.get("config") if progress is not None else load_recipe(str(folder.config_path))
    info = read_json(folder.path / "run.json", "run description") if (folder.path / "run.json").is_file() else {}
    # the recipe the run started from (a run killed before run.json: the one its command implied)
    implied = info["recipe"] if "recipe" in info else implied_recipe(overrides)
    cfg = resumed_config(saved, recipe, overrides, f"run {folder.path}", implied)
    if progress is not None:
        check_resume_length(progress, cfg, f"run {folder.path}")
    with session(cfg, ctx) as ctx:
        folder.enabled = ctx.is_main
        with locked(folder, ctx):
            return Run(cfg, folder, ctx, info.get("recipe")).execute()
