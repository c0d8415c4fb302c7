"""``bestformer eval CKPT``: rebuild the model from the checkpoint's sidecar alone and report top-1 / top-5
accuracy and the loss on a dataset split (the test split by default)."""

from __future__ import annotations

import argparse

from .options import integer

HELP = "evaluate a checkpoint on a dataset (top-1 / top-5)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a .safetensors checkpoint (e.g. runs/<name>/best.safetensors)")
    parser.add_argument("--dataset", default=None,
                        help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="folder of the dataset files")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="which split to evaluate (val: the seeded split carved from the training data, "
                             "with the checkpoint's seed and val_fraction)")
    parser.add_argument("--batch-size", type=integer(1), default=256, help="samples per batch")
    parser.add_argument("--limit", type=integer(1), default=None, help="evaluate at most this many samples per split")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", default=None, choices=("auto", "fast", "bf16", "fp16", "off"),
                        help="autocast (default: the checkpoint's training run's; auto: bf16 on CUDA)")
    parser.add_argument("--flip", default=None, action=argparse.BooleanOptionalAction,
                        help="flip test-time augmentation (default: the training run's eval_flip)")
    parser.add_argument("--workers", type=integer(0), default=0, help="data-loading worker processes")


def run(args: argparse.Namespace) -> int:
    from ..data import build_datasets
    from ..errors import ConfigError, InputError
    from ..training import evaluate, load_checkpoint
    from ..training.distributed import DistContext, resolve_device

    model, meta = load_checkpoint(args.checkpoint)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    dataset = args.dataset or meta.get("dataset") or config.get("dataset")
    if not dataset:
        raise ConfigError(f"{args.checkpoint} does not record its dataset; pass --dataset NAME")
    # the training run's seed and val_fraction: the same carve of train / validation as during training
    bundle = build_datasets(dataset, args.data_dir, time_steps=getattr(model, "time_steps", None) or 4,
                            split_by=config.get("split_by", "number"), val_fraction=config.get("val_fraction", 0.1),
                            seed=config.get("seed", 0), limit=args.limit)
    classes = getattr(model, "num_classes", bundle.num_classes)
    if bundle.num_classes != classes:
        raise InputError(f"{dataset} has {bundle.num_classes} classes but the checkpoint {args.checkpoint} predicts "
                         f"{classes}; evaluate it on the dataset it was trained on")
    split = getattr(bundle, args.split)
    if split is None:
        raise ConfigError(f"{dataset} has no {args.split} split here; choose another --split")
    ctx = DistContext(device=resolve_device(args.device))
    model.to(ctx.device)
    # by default the training run's own evaluation settings, so that its recorded validation accuracy is reproduced
    amp = args.amp or config.get("amp", "auto")
    flip = bool(config.get("eval_flip", False)) if args.flip is None else args.flip
    res = evaluate(model, split, num_classes=bundle.num_classes, batch_size=args.batch_size, ctx=ctx, amp=amp,
                   workers=args.workers, desc=f"{dataset} {args.split}", where=f"{dataset} {args.split} split",
                   flip=flip)
    print(f"{meta['model_name']} on {dataset} {args.split} ({res['count']} samples): top-1 {res['acc1']:.2f}%  "
          f"top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}  (amp {amp}{', flip TTA' if flip else ''})")
    return 0
