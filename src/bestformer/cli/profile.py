"""``bestformer profile MODEL_OR_CKPT``: model size, MACs, firing rates, SOPs, energy and NS-ACE of a registered
model or a checkpoint, measured on batches of its dataset (or on synthetic input with ``--synthetic``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.precision import FP_BITS
from .options import integer, output_file

HELP = "model size, MACs, firing rates, SOPs, energy and NS-ACE of a model or checkpoint"

_MODEL_OPTIONS = ("num_classes", "in_channels", "img_size", "time_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_CKPT",
                        help="a registered model name (see bestformer.list_models()), a checkpoint path or "
                             "zoo:NAME (bestformer zoo)")
    opts = parser.add_argument_group("model options (with a model name)")
    opts.add_argument("--num-classes", type=integer(1))
    opts.add_argument("--in-channels", type=integer(1))
    opts.add_argument("--img-size", type=integer(1, 4096))
    opts.add_argument("--time-steps", type=integer(1, 4096))
    data = parser.add_argument_group("input")
    data.add_argument("--dataset", help="dataset to measure firing rates on (default: the model's own)")
    data.add_argument("--data-dir", help="folder of the dataset files")
    data.add_argument("--batches", type=integer(1), default=4, help="batches to run (default 4)")
    data.add_argument("--batch-size", type=integer(1), default=16, help="samples per batch (default 16)")
    data.add_argument("--synthetic", action="store_true",
                      help="random input instead of data (the output says firing rates were measured on it)")
    data.add_argument("--seed", type=integer(0), default=0,
                      help="seed of the synthetic input and of a freshly built (untrained) model's weights")
    data.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    acct = parser.add_argument_group("accounting")
    acct.add_argument("--energy", default="45nm", choices=("45nm", "fp16", "int8"),
                      help="energy per MAC / AC: 45nm 4.6 / 0.9 pJ (default), fp16 1.5 / 0.4, int8 0.23 / 0.03")
    acct.add_argument("--fp-bits", type=integer(1, 64), default=FP_BITS,
                      help="bits of a full-precision weight in NS-ACE and in a full-precision model's size (default "
                           "16, as the papers' Tables 2 and 3)")
    acct.add_argument("--representation", action="store_true",
                      help="also measure each encoder block's value-set size and entropy (paper Fig. 2 / 5b)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", nargs="?", const="-", metavar="PATH", type=output_file("JSON file", stdout=True),
                     help="the profile as JSON: to stdout instead of the table, or written to PATH")
    out.add_argument("--plot", metavar="PNG", type=output_file("plot"),
                     help="write per-layer firing rate and energy bars to this PNG")


def _load(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to profile and its checkpoint's header ``meta`` (``None`` for a model name)."""
    import torch

    from ..errors import ConfigError, FileFormatError
    from ..models import is_model
    from ..pipeline import load_weights_spec
    from ..zoo import create_model

    options = {k: getattr(args, k) for k in _MODEL_OPTIONS if getattr(args, k) is not None}
    path = Path(args.model)
    if is_model(args.model):
        torch.manual_seed(args.seed)  # an untrained model's profile is the same at every call
        return create_model(args.model, **options), None
    if path.is_file() or path.suffix == ".safetensors" or args.model.startswith("zoo:"):
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise ConfigError(f"{flags} apply to a model name; the checkpoint {path} fixes its own architecture")
        return load_weights_spec(args.model)  # a checkpoint, or a zoo entry as eval and export take it
    if path.suffix or len(path.parts) > 1:
        raise FileFormatError(f"checkpoint not found: {path}")
    return create_model(args.model, **options), None  # an unknown name: the registry's error names close ones


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from ..analysis import profile_model
    from ..deploy import fold  # noqa: F401  (loading it registers the deployment-file size with analysis)
    from ..errors import ConfigError
    from ..training.saved import saved_dataset, saved_model_data

    model, meta = _load(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ConfigError(f"invalid --device {args.device!r} ({err})") from None
    model.to(device)
    kwargs: dict[str, Any] = dict(batches=args.batches, energy=args.energy, synthetic=args.synthetic,
                                  batch_size=args.batch_size, fp_bits=args.fp_bits,
                                  representation=args.representation, seed=args.seed)
    if not args.synthetic and meta is not None and (args.dataset or saved_dataset(meta)):
        # the run's own validation carve and event binning, as `eval` measures it
        kwargs["data"] = saved_model_data(model, meta, source=args.model, dataset=args.dataset,
                                          data_dir=args.data_dir, limit=args.batches * args.batch_size)
    elif not args.synthetic:
        kwargs.update(dataset=args.dataset, data_dir=args.data_dir)
    profile = profile_model(model, **kwargs)
    if args.json == "-":
        sys.stdout.write(profile.to_json() + "\n")
    else:
        # a log file or pipe gets wide lines rather than rich's 80-column default
        Console(width=None if sys.stdout.isatty() else 160).print(profile.table())
        if args.json:
            profile.to_json(args.json)
            print(f"wrote {args.json}")
    if args.plot:
        profile.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0
