"""Evaluation jobs: a finished run's best weights on its held-out splits and its profile, and a saved model on its
own dataset (``bestformer eval``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.utils.data import DataLoader

from ..analysis import profile_model
from ..data import time_first
from ..deploy import fold  # noqa: F401  (loading it registers the deployment-file size profile.json records)
from ..errors import BestformerError, ConfigError, FileFormatError
from ..training.config import TrainConfig, field_choices
from ..training.dist import DistContext, resolve_device
from ..training.evaluation import evaluate
from ..training.result import TrainResult
from ..training.saved import saved_config, saved_model_data


def write_profile(model: nn.Module, bundle: Any, path: Path, batches: int = 4) -> str:
    """Issue 4: size, SOPs, energy and NS-ACE of the trained model, measured on a few held-out batches of
    ``bundle`` and written as JSON to ``path`` (``profile.json`` beside a run's checkpoints); returns the line of
    totals to print (a line saying why, and no file, when it cannot be measured)."""
    which, split = ("validation", bundle.val) if bundle.val is not None else ("test", bundle.test)
    if split is None:
        return "profile: skipped (no held-out split to measure firing rates on)"
    loader = DataLoader(split, batch_size=16, shuffle=False)
    try:
        prof = profile_model(model, (time_first(x) for x, _ in loader), batches=batches,
                             measured_on=f"{bundle.name} ({which})", progress=False)
    except BestformerError as err:
        return f"profile: skipped ({err})"
    prof.to_json(path)
    return f"profile ({path}): {prof.summary()}"


def evaluate_best(result: TrainResult, model: nn.Module, bundle: Any, cfg: TrainConfig, ctx: DistContext,
                  history: list[dict[str, Any]], best_epoch: int | None) -> None:
    """Fill ``result.val`` and ``result.test`` with the metrics of the best weights (already in ``model``), each
    evaluated once: validation from the history when the best epoch was validated there, else a new pass."""
    kw = dict(num_classes=bundle.num_classes, batch_size=cfg.batch_size, ctx=ctx, amp=cfg.amp,
              workers=cfg.workers, flip=cfg.eval_flip)
    best = next((row for row in history if row["epoch"] == best_epoch), None)
    if bundle.val is not None and best is not None and math.isfinite(best["val_acc"]):
        # the best weights were validated at the end of their epoch (the history holds it): no second pass
        result.val = {"loss": best["val_loss"], "acc1": best["val_acc"], "acc5": best["val_top5"],
                      "count": len(bundle.val)}
    elif bundle.val is not None:
        result.val = evaluate(model, bundle.val, desc="validate (best)", where="validation split", **kw)
    if bundle.test is not None:
        result.test = evaluate(model, bundle.test, desc="test", where="test split", **kw)


def _sample_limit(limit: Any) -> bool:
    """Whether ``limit`` is a sample limit per split: an integer >= 1, or ``None`` (whole splits)."""
    return limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)


def evaluate_saved(model: nn.Module, meta: dict[str, Any], *, source: str = "the model",
                   dataset: str | None = None, data_dir: str | None = None, split: str = "test",
                   limit: int | Literal["run"] | None = "run", batch_size: int = 256, device: str = "auto",
                   amp: str | None = None, flip: bool | None = None, workers: int = 0) -> dict[str, Any]:
    """Evaluate a saved model (``load_weights_spec``) on a split of its dataset, by default with its training run's
    own evaluation settings (amp, flip TTA), its seed and val_fraction (the same validation carve as during
    training) and its sample ``limit`` per split (``None``: whole splits), so that its recorded accuracy is
    reproduced. Returns ``evaluate``'s metrics plus ``dataset``, ``amp`` and ``flip``."""
    config, amps = saved_config(meta), field_choices("amp")
    if amp is not None and amp not in amps:
        raise ConfigError(f"amp must be one of {', '.join(amps)}, got {amp!r}")
    if not (limit == "run" or _sample_limit(limit)):
        raise ConfigError(f"limit must be an integer >= 1, 'run' or None, got {limit!r}")
    # the training run's own settings, where the caller leaves them: read from the file, so checked
    amp = amp or config.get("amp", "auto")
    flip = config.get("eval_flip", False) if flip is None else flip
    limit = config.get("limit") if limit == "run" else limit
    if amp not in amps or not isinstance(flip, bool) or not _sample_limit(limit):
        raise FileFormatError(f"{source} records amp={amp!r}, eval_flip={flip!r}, limit={limit!r}; expected amp one "
                              f"of {', '.join(amps)}, a boolean eval_flip and a limit >= 1 or none")
    bundle = saved_model_data(model, meta, source=source, dataset=dataset, data_dir=data_dir, limit=limit)
    dataset = bundle.name
    data = getattr(bundle, split)
    if data is None:
        raise ConfigError(f"{dataset} has no {split} split here; choose another --split")
    ctx = DistContext(device=resolve_device(device))
    model.to(ctx.device)
    res = evaluate(model, data, num_classes=bundle.num_classes, batch_size=batch_size, ctx=ctx, amp=amp,
                   workers=workers, desc=f"{dataset} {split}", where=f"{dataset} {split} split", flip=flip)
    return {**res, "dataset": dataset, "amp": amp, "flip": flip}
