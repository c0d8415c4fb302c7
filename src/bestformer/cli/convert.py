"""``bestformer convert CKPT -o snn.safetensors --time-steps T [--delay d] [--dataset D --data-dir P --limit N]``.

Loads a trained ``csd_*`` ANN checkpoint, converts it into the spike-driven CSDformer (``bestformer.convert``),
measures the conversion error (max |logit difference| against the quantized ANN, top-1 agreement) and both
accuracies on the dataset's test split (random inputs without ``--dataset``), sweeps the DIF delay from 0 to
``T`` (table and PNG plot), and saves the spiking model as a checkpoint that ``bestformer eval`` and
``bestformer profile`` load like any other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from ..convert import ConversionResult, SpikingCSD, conversion_errors, convert, plot_delay_sweep, sweep_delays
from ..errors import ConfigError
from ..fileio import check_output
from ..training import load_checkpoint, save_checkpoint
from .options import integer, output_file

HELP = "convert a trained CSDformer ANN checkpoint into a spike-driven model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint of a trained csd_* ANN (bestformer train --recipe none --model "
                                      "csd_tiny --dataset digits)")
    p.add_argument("-o", "--output", required=True, type=output_file("spiking model"),
                   help="spiking model to write (.safetensors, plus a .json)")
    p.add_argument("--time-steps", "-T", type=integer(1, 4096), default=None,
                   help="time steps T (default: the ANN's activation levels L, the exact setting)")
    p.add_argument("--delay", type=integer(0, 4096), default=None,
                   help="delay d of the DIF neurons, 0 (plain IF) to T (default T: exact)")
    p.add_argument("--dataset", default=None,
                   help="measure on this dataset's test split (e.g. digits, mnist); default: random inputs")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the dataset's default location)")
    p.add_argument("--limit", type=integer(1), default=1000, help="samples to evaluate (default 1000)")
    p.add_argument("--batch-size", type=integer(1), default=100)
    p.add_argument("--no-sweep", action="store_true", help="measure only the chosen delay, not 0..T")
    p.add_argument("--plot", default=None, type=output_file("plot"),
                   help="PNG of the delay sweep (default: OUTPUT.delays.png)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the random inputs used without --dataset")


def _batches(args: argparse.Namespace, snn: SpikingCSD) -> tuple[list[tuple[Tensor, Tensor | None]], str]:
    """The evaluation batches and a description of them."""
    if args.dataset is None:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.limit, snn.in_channels, snn.img_size, snn.img_size, generator=gen)
        return [(xb, None) for xb in x.split(args.batch_size)], f"{args.limit} random N(0, 1) inputs"
    from torch.utils.data import DataLoader

    from ..data import build_datasets, time_first

    bundle = build_datasets(args.dataset, args.data_dir, time_steps=snn.time_steps, limit=args.limit)
    split, name = (bundle.test, "test") if bundle.test is not None else (bundle.val, "validation")
    if split is None:
        raise ConfigError(f"dataset {args.dataset} has neither a test nor a validation split to measure on")
    batches = [(time_first(x), y) for x, y in DataLoader(split, batch_size=args.batch_size)]
    return batches, f"{args.dataset} {name} split ({len(split)} samples)"  # type: ignore[arg-type]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _print_sweep(results: list[ConversionResult], chosen: int) -> None:
    print("conversion error against the DIF delay (d = T is exact):")
    print(f"  {'delay':>5} {'latency':>7} {'max|diff|':>10} {'mean|diff|':>10} {'agreement':>9} {'accuracy':>8}")
    for r in results:
        mark = "  <- saved" if r.delay == chosen else ""
        print(f"  {r.delay:>5} {r.latency:>7} {r.max_abs:>10.4g} {r.mean_abs:>10.4g} {_pct(r.agreement):>9} "
              f"{_pct(r.snn_accuracy):>8}{mark}")


def run(args: argparse.Namespace) -> int:
    out = args.output
    check_output(out.with_suffix(".json"), "sidecar")
    ann, meta = load_checkpoint(args.checkpoint)
    snn = convert(ann, args.time_steps, args.delay)
    steps, delay = snn.time_steps, snn.delay
    print(f"converted {meta['model_name']} ({args.checkpoint}): T={steps}, DIF delay d={delay}, "
          f"latency {snn.latency} steps ({snn.neuron_depth} IF layers deep)")
    if steps != ann.levels:
        print(f"note: T={steps} differs from the ANN's L={ann.levels} activation levels; the conversion is "
              f"exact only for T = L")
    batches, what = _batches(args, snn)
    delays = [delay] if args.no_sweep else sorted({*sweep_delays(steps), delay})
    results = conversion_errors(ann, batches, steps, delays, progress=True)
    chosen = next(r for r in results if r.delay == delay)
    print(f"measured on {what}")
    if chosen.ann_accuracy is not None:
        print(f"quantized ANN (L={ann.levels}) accuracy: {_pct(chosen.ann_accuracy)}")
        print(f"spiking model (T={steps}, d={delay}) accuracy: {_pct(chosen.snn_accuracy)}")
    print(f"conversion error: max |logit difference| {chosen.max_abs:.4g}, mean {chosen.mean_abs:.4g}, "
          f"top-1 agreement with the ANN {_pct(chosen.agreement)}")
    if len(results) > 1:
        _print_sweep(results, delay)
    save_checkpoint(snn, out, source_checkpoint=str(args.checkpoint), evaluated_on=what,
                    conversion=chosen.as_dict(), delay_sweep=[r.as_dict() for r in results])
    wrote = [str(out), str(out.with_suffix(".json"))]
    if len(results) > 1:
        plot = Path(args.plot) if args.plot else out.with_suffix(".delays.png")
        wrote.append(str(plot_delay_sweep(results, plot, title=f"{meta['model_name']} -> spiking, T={steps}")))
    print("wrote " + ", ".join(wrote))
    return 0
