"""Time to accuracy on CIFAR-10: the ``cifar10-fast`` recipe beside the best CIFAR-10 setting this library had
before it, each given the same wall-clock budget on this machine, validation accuracy against minutes.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data/cifar10/cifar10-train-jpeg.tar.gz --budget 60m

The two runs, one after the other in this process (never at the same time: they would share the cores):

    fast        ``bestformer train --recipe cifar10-fast --time-budget B`` (docs/training.md)
    previous    the setting of the CIFAR-10 Table 4 run (benchmarks/ablation.py's docstring): bestformer_tiny
                (width 64, one block, the reference stem), batch 64, AdamW lr 5e-3 after a 0.3-epoch warm-up,
                no mixup / RandAugment / random erasing, T = 4 throughout, one validation per epoch; here on the
                whole training split, with the same budget planner so that its schedule ends with the budget
                (without a teacher: a teacher would be paid from the same budget)

Validation is carved from the training split (the CIFAR-10 test split is held out). Each run's curve is its
per-epoch validation accuracy against the wall-clock minutes since its start (data loading included). Prints the
CPU and its vector extensions first and the final accuracies and their difference last; writes
``benchmarks/results/time_to_accuracy.json`` and ``.png`` (``--tag`` names other files). ``--set KEY=VALUE``
(repeatable) overrides a key of the fast recipe, for lever measurements.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from accuracy import plot_curves
from bestformer.cli.train import key_value
from bestformer.hardware import cpu_info
from bestformer.pipeline import resolve_config, train
from bestformer.training.budget import parse_duration

RESULTS = Path(__file__).resolve().parent / "results"
#: the CIFAR-10 Table 4 setting of benchmarks/ablation.py (its +RF +IED model without the teacher)
PREVIOUS = {"model": "bestformer_tiny", "batch_size": 64, "accum_steps": 1, "lr": 0.005, "warmup_lr": 0.0005,
            "warmup_epochs": 0.3, "cooldown_epochs": 0, "mixup": 0.0, "rand_augment": None, "random_erasing": 0.0,
            "teacher": None, "epochs": 1}
def run_one(label: str, recipe: str, overrides: dict, args: argparse.Namespace) -> dict:
    cfg, used = resolve_config(recipe, {"data_dir": args.data_dir, "time_budget": args.budget,
                                        "out": str(args.out), "name": f"{label}-{int(time.time())}",
                                        "seed": args.seed, **overrides})
    t0 = time.perf_counter()
    result = train(cfg, recipe=used)
    seconds = time.perf_counter() - t0
    if result.status != "finished" or result.val is None:
        raise SystemExit(f"{label}: the run ended {result.status} without a validation result ({result.run_dir})")
    curve = [(row["wall_s"] / 60.0, row["val_acc"]) for row in result.history]
    return {"recipe": used, "overrides": overrides, "run_dir": str(result.run_dir), "model": cfg.model,
            "minutes": seconds / 60.0, "val_acc": result.val["acc1"], "best_epoch": result.best_epoch,
            "steps": result.history[-1]["step"], "curve_minutes_acc": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 (the JPEG training split .tar.gz or a folder)")
    p.add_argument("--budget", default="60m", help="wall-clock budget of each run (e.g. 60m, 10m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. a lever's name)")
    p.add_argument("--only", choices=("fast", "previous"), default=None, help="run one of the two only")
    p.add_argument("--set", dest="sets", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="override a key of the fast recipe (repeatable)")
    args = p.parse_args()
    parse_duration(args.budget)  # a bad budget fails before anything runs
    print(f"CPU: {cpu_info().describe()}")
    runs: dict[str, dict] = {}
    if args.only in (None, "fast"):
        runs["fast"] = run_one("fast", "cifar10-fast", dict(args.sets), args)
    if args.only in (None, "previous"):
        runs["previous"] = run_one("previous", "cifar10", dict(PREVIOUS), args)
    suffix = f"_{args.tag}" if args.tag else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "time_to_accuracy", "dataset": "cifar10 (validation split carved from the training split)",
           "budget": args.budget, "seed": args.seed, "cpu": cpu_info().as_dict(), "runs": runs}
    (RESULTS / f"time_to_accuracy{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
    _plot(runs, RESULTS / f"time_to_accuracy{suffix}.png",
          f"CIFAR-10 validation accuracy against wall-clock minutes, budget {args.budget} each; "
          f"{cpu_info().describe()}")
    for name, r in runs.items():
        print(f"{name}: {r['model']} ({r['recipe']}), {r['steps']} steps in {r['minutes']:.1f} min, "
              f"val top-1 {r['val_acc']:.2f}%")
    if len(runs) == 2:
        print(f"final val top-1: fast {runs['fast']['val_acc']:.2f}% vs previous {runs['previous']['val_acc']:.2f}%"
              f" | difference {runs['fast']['val_acc'] - runs['previous']['val_acc']:+.2f} points")


def _plot(runs: dict, path: Path, title: str) -> None:
    curves = {f"{name}: {r['model']} ({r['val_acc']:.1f}%)": tuple(zip(*r["curve_minutes_acc"])) or ((), ())
              for name, r in runs.items()}
    plot_curves(curves, path, title, "wall-clock minutes since the start of the run")


if __name__ == "__main__":
    main()
