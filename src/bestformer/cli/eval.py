"""``bestformer eval CKPT``: rebuild the model from the checkpoint's header (or a zoo entry) and report top-1 / top-5
accuracy and the loss on a dataset split (the test split by default)."""

from __future__ import annotations

import argparse

from .options import integer

HELP = "evaluate a checkpoint on a dataset (top-1 / top-5)"


def _limit(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else integer(1)(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import field_choices

    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a .safetensors checkpoint (e.g. runs/<name>/best.safetensors) or zoo:NAME "
                             "(bestformer zoo)")
    parser.add_argument("--dataset", default=None,
                        help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="folder of the dataset files")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="which split to evaluate (val: the seeded split carved from the training data, "
                             "with the checkpoint's seed and val_fraction)")
    parser.add_argument("--batch-size", type=integer(1), default=256, help="samples per batch")
    parser.add_argument("--limit", type=_limit, default=argparse.SUPPRESS,
                        help="at most this many samples per split, or none for whole splits (default: the training "
                             "run's own limit, so that its recorded accuracy is reproduced)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", default=None, choices=field_choices("amp"),
                        help="autocast (default: the checkpoint's training run's; auto: bf16 on CUDA)")
    parser.add_argument("--flip", default=None, action=argparse.BooleanOptionalAction,
                        help="flip test-time augmentation (default: the training run's eval_flip)")
    parser.add_argument("--workers", type=integer(0), default=0, help="data-loading worker processes")


def run(args: argparse.Namespace) -> int:
    from ..pipeline import evaluate_saved, load_weights_spec

    model, meta = load_weights_spec(args.checkpoint)
    res = evaluate_saved(model, meta, source=f"the checkpoint {args.checkpoint}", dataset=args.dataset,
                         data_dir=args.data_dir, split=args.split, limit=getattr(args, "limit", "run"),
                         batch_size=args.batch_size, device=args.device, amp=args.amp, flip=args.flip,
                         workers=args.workers)
    print(f"{meta['model_name']} on {res['dataset']} {args.split} ({res['count']} samples): top-1 {res['acc1']:.2f}%  "
          f"top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}  (amp {res['amp']}{', flip TTA' if res['flip'] else ''})")
    return 0
