"""``bestformer predict MODEL.bst INPUTS``: run a packed model with the bit-packed runtime (no torch needed for
array inputs).

INPUTS is a ``.npy`` array of images ``[B, C, H, W]`` (or event frames ``[T, B, C, H, W]``), a ``.npz`` with
``x`` (or ``images`` / ``inputs``) and optional labels ``y`` (or ``labels``), or a dataset name read with
``--data-dir`` (``bestformer.data``), e.g. ``bestformer predict model.bst mnist --data-dir data/mnist``."""

from __future__ import annotations

import argparse
from typing import Any

from .options import integer, output_file

HELP = "run a packed model file on inputs with the bit-packed runtime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.bst", help="a packed model written by `bestformer export`")
    parser.add_argument("inputs", metavar="INPUTS", help=".npy / .npz file of inputs, or a dataset name")
    parser.add_argument("--data-dir", default=None, help="dataset folder (when INPUTS is a dataset name)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="dataset split")
    parser.add_argument("--limit", type=integer(1), default=None, help="at most this many samples")
    parser.add_argument("--batch-size", type=integer(1), default=32, help="samples per batch")
    parser.add_argument("--threads", type=integer(1), default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--output", type=output_file("predictions file"), default=None,
                        help="write logits and predictions to this .npz file")
    parser.add_argument("--show", type=integer(0), default=10, help="print the first N predictions")


def _load_arrays(path: str):  # -> tuple[np.ndarray, np.ndarray | None]
    import zipfile
    import zlib

    import numpy as np

    from ..errors import FileFormatError

    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data, None
        with data:  # an .npz decompresses its members on access: damage shows here
            keys = list(data.keys())
            xk = next((k for k in ("x", "images", "inputs") if k in keys), keys[0] if len(keys) == 1 else None)
            if xk is None:
                raise FileFormatError(f"{path} holds {keys}; name the inputs 'x' (and labels 'y')")
            yk = next((k for k in ("y", "labels", "targets") if k in keys), None)
            return data[xk], (data[yk] if yk else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise FileFormatError(f"cannot read inputs {path}: {type(err).__name__}: {err}") from None


def _check_labels(y: Any, num_classes: int, where: str) -> None:
    """Labels must be class indices of the model (scoring label 700 against a 10-class model means nothing)."""
    import numpy as np

    from ..errors import InputError

    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"the labels of {where} must be integers in [0, {num_classes}), got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"the labels of {where} must be integers in [0, {num_classes}) for this {num_classes}-class "
                         f"model; got {y.dtype} values in [{y.min()}, {y.max()}]")


def _dataset_batches(name: str, args: argparse.Namespace, time_steps: int, batch: int):
    """``(number of batches, iterator of (inputs, labels) numpy batches)`` from ``bestformer.data`` (imports torch)."""
    import numpy as np

    from ..data import build_datasets
    from ..errors import ConfigError

    bundle = build_datasets(name, args.data_dir, time_steps=time_steps, limit=args.limit)
    split = getattr(bundle, args.split)
    if split is None:
        raise ConfigError(f"{name} has no {args.split} split; choose another --split")
    n = len(split)

    def batches():
        for lo in range(0, n, batch):
            xs, ys = zip(*(split[i] for i in range(lo, min(lo + batch, n))), strict=True)
            x = np.stack([np.asarray(v) for v in xs]).astype(np.float32)
            if x.ndim == 5:  # [B, T, C, H, W] -> the models' time-first layout
                x = x.transpose(1, 0, 2, 3, 4)
            yield x, np.asarray([int(y) for y in ys])

    return -(-n // batch), batches()


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from ..deploy.runtime import PackedModel
    from ..errors import InputError
    from ..progress import progress_bar

    model = PackedModel.load(args.model, threads=args.threads)
    is_file = Path(args.inputs).suffix in (".npy", ".npz") or Path(args.inputs).is_file()
    if is_file:
        x, y = _load_arrays(args.inputs)
        if y is not None:
            _check_labels(np.asarray(y), model.num_classes, args.inputs)
        axis = 1 if np.ndim(x) == 5 else 0
        if args.limit is not None:
            x = np.take(x, range(min(args.limit, x.shape[axis])), axis=axis)
            y = None if y is None else y[: args.limit]
        n = x.shape[axis] if np.ndim(x) in (4, 5) else 0
        model.check_input(x)
        batches = ((np.take(x, range(lo, min(lo + args.batch_size, n)), axis=axis),
                    None if y is None else y[lo:lo + args.batch_size]) for lo in range(0, n, args.batch_size))
        total = -(-n // args.batch_size)
    else:
        total, batches = _dataset_batches(args.inputs, args, model.time_steps, args.batch_size)
    logits, labels = [], []
    t0 = time.perf_counter()
    for xb, yb in progress_bar(batches, total=total, desc="predict", unit="batch"):
        logits.append(model.predict(xb, batch_size=args.batch_size))
        if yb is not None:
            labels.append(np.asarray(yb))
    elapsed = time.perf_counter() - t0
    if not logits:
        raise InputError(f"{args.inputs} holds no samples")
    out = np.concatenate(logits)
    pred = out.argmax(1)
    shown = ", ".join(str(p) for p in pred[: args.show])
    print(f"{len(pred)} samples in {elapsed:.2f} s ({len(pred) / elapsed:.1f} samples/s, {model.threads} threads); "
          f"predictions: {shown}{' ...' if len(pred) > args.show else ''}")
    if labels:
        y = np.concatenate(labels)
        if y.shape != pred.shape:
            raise InputError(f"{len(y)} labels for {len(pred)} inputs")
        _check_labels(y, model.num_classes, args.inputs)
        print(f"top-1 accuracy: {(pred == y).mean():.2%} ({int((pred == y).sum())}/{len(y)})")
    if args.output:
        from ..fileio import atomic_path

        with atomic_path(args.output) as tmp, open(tmp, "wb") as fh:  # checked at parsing, before the compute
            np.savez(fh, logits=out, predictions=pred)
        print(f"wrote {args.output}")
    return 0
