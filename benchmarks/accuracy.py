"""Accuracy of the tiny BESTformer (1-bit weights, T=4) with and without distillation, beside the
full-precision Spikformer of the same size, on digits, MNIST or N-MNIST.

    python benchmarks/accuracy.py digits
    python benchmarks/accuracy.py mnist --data-dir ../shared/data/mnist --budget 0.1
    python benchmarks/accuracy.py nmnist --data-dir ../shared/data/nmnist/nmnist-small.tar.gz

The options of each dataset are its shipped recipe (``bestformer/recipes/<dataset>.yaml``); ``--budget B``
scales the epochs (and, below 1, the samples per split) by ``B`` so that a CPU run fits in the time at hand.
Four trainings in one process: the ANN teacher (trained first, in the distilled run's folder), BESTformer with
distillation (Eq. 15), BESTformer without it, Spikformer (full precision). Prints one line of results (the
accuracy ratio last) and writes ``benchmarks/results/accuracy_<dataset>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import time
from pathlib import Path

import torch

from bestformer.cli.train import key_value
from bestformer.pipeline import resolve_config, train
from bestformer.training import TrainResult, load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


FULL_SIZES = {"digits": 1797, "mnist": 70000, "nmnist": 1100, "cifar10": 50000}


def budgeted(dataset: str, budget: float, limit: int | None, data_dir: str | None, out: Path, seed: int,
             recipe_name: str | None = None, overrides: dict | None = None) -> dict:
    """The dataset's recipe (or ``recipe_name``) scaled by ``budget``: its epochs (the teacher's too), and below 1
    the samples per split (unless ``limit`` is given: 0 keeps every sample); then ``overrides`` (``--set``). The
    keys counted in epochs follow the run's epochs, overridden or not: the cool-down and the mixup-off epoch in
    proportion to the recipe's epochs, the warm-up stays the recipe's but at most a quarter of the run, and a
    teacher trains the student's epochs where the recipe has none of its own."""
    recipe = load_recipe(recipe_name or dataset)
    overrides = overrides or {}
    epochs = overrides.get("epochs", max(1, math.ceil(recipe["epochs"] * budget)))
    teacher_epochs = math.ceil(recipe["teacher_epochs"] * budget) if "teacher_epochs" in recipe else epochs
    scaled = {"epochs": epochs, "data_dir": data_dir, "seed": seed, "out": str(out),
              "warmup_epochs": min(recipe.get("warmup_epochs", 0), epochs / 4),
              "teacher_epochs": max(1, teacher_epochs)}
    for key in ("cooldown_epochs", "mixup_off_epoch"):
        if key in recipe:
            scaled[key] = math.ceil(recipe[key] * epochs / recipe["epochs"])
    if limit is None and budget < 1:
        limit = max(200, math.ceil(FULL_SIZES[dataset] * budget))
    if limit:
        scaled["limit"] = limit
    return {**scaled, **overrides}


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The options every budgeted benchmark shares (``dataset`` and ``--data-dir`` are the caller's)."""
    p.add_argument("--budget", type=float, default=1.0, help="scale of epochs and subset (1: the full recipe)")
    p.add_argument("--limit", type=int, default=None, help="samples per split (overrides the budget's; 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    p.add_argument("--out", default="runs/benchmarks", help="root of the run folders")
    p.add_argument("--set", dest="overrides", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="override a recipe key after the budget (repeatable), e.g. --set batch_size=64")


def budget_options(p: argparse.ArgumentParser, args: argparse.Namespace, benchmark: str) -> dict:
    """:func:`budgeted` options of the parsed ``args`` then its ``--set`` overrides, run folders under
    ``<out>/<benchmark>-<dataset>-<time>``."""
    if not 0 < args.budget < math.inf:
        p.error(f"--budget must be a finite number > 0, got {args.budget}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = dict(args.overrides)
    base = budgeted(args.dataset, args.budget, args.limit, args.data_dir,
                    Path(args.out) / f"{benchmark}-{args.dataset}-{stamp}", args.seed, getattr(args, "recipe", None),
                    overrides)
    if args.threads and "threads" not in overrides:
        base["threads"] = args.threads
    # this process too, at the runs' count (given, else the recipe's): a run puts back the caller's count when it
    # ends, and what follows it here (conversion, profiles, the JSON's torch_threads) must run as the runs did
    threads = base.get("threads") or load_recipe(getattr(args, "recipe", None) or args.dataset).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return base


def budget_text(args: argparse.Namespace, base: dict) -> str:
    """The budget of a run in words, for the tables: epochs, subset, every ``--set`` override."""
    return (f"budget {args.budget:g}: {base['epochs']} epochs"
            + (f" (+{base['cooldown_epochs']} cool-down)" if base.get("cooldown_epochs") else "")
            + (f", at most {base['limit']} samples per split" if base.get("limit") else ", full data")
            + "".join(f", {key} {value}" for key, value in args.overrides))


def checked(result: TrainResult) -> TrainResult:
    """Stop the benchmark when a run was interrupted (Ctrl-C / SIGTERM): its numbers would be partial."""
    if result.status == "interrupted":
        raise SystemExit(f"interrupted; continue that run with: bestformer train --resume {result.run_dir}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=("digits", "mnist", "nmnist"))
    p.add_argument("--data-dir", default=None, help="dataset folder (MNIST IDX files / N-MNIST archive)")
    add_budget_arguments(p)
    args = p.parse_args()
    base = budget_options(p, args, "accuracy")
    recipe = load_recipe(args.dataset)
    t0 = time.perf_counter()
    rows = {}
    kd, _ = resolve_config(args.dataset, {**base, "name": "bestformer_kd"})
    r = checked(train(kd))
    teacher_ckpt = r.run_dir / "teacher" / "best.safetensors"
    rows["teacher (" + recipe["teacher"] + ")"] = r.teacher
    rows["bestformer + distillation"] = r
    plain, _ = resolve_config(args.dataset, {**base, "name": "bestformer", "teacher": None})
    rows["bestformer"] = checked(train(plain))
    spik_args = {**recipe.get("model_args", {}), **base.get("model_args", {})}  # the same size, --set included
    spik, _ = resolve_config(args.dataset, {**base, "name": "spikformer", "teacher": None,
                                            "model": recipe["model"].replace("bestformer", "spikformer"),
                                            "model_args": spik_args})
    rows["spikformer (full precision)"] = checked(train(spik))
    seconds = time.perf_counter() - t0

    table = {name: {"model": res.model_name, "val_acc": res.val["acc1"] if res.val else None,
                    "test_acc": res.test["acc1"] if res.test else None,
                    "test_samples": res.test["count"] if res.test else None,
                    "one_bit_params": res.params[0], "full_precision_params": res.params[1],
                    "epochs": res.epochs_done, "train_minutes": res.seconds / 60,
                    "val_curve": [h["val_acc"] for h in res.history]}
             for name, res in rows.items()}
    meta = {"dataset": args.dataset, "budget": args.budget, "options": base, "teacher_checkpoint": str(teacher_ckpt),
            "seconds": seconds, "torch_threads": torch.get_num_threads(), "results": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{args.dataset}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _plot(table, RESULTS / f"accuracy_{args.dataset}.png", f"{args.dataset}, {budget_text(args, base)}")

    def acc(name: str) -> float:
        return table[name]["test_acc"] if table[name]["test_acc"] is not None else table[name]["val_acc"]

    ratio = acc("bestformer + distillation") / acc("spikformer (full precision)")
    minutes = " | ".join(f"{name} {row['train_minutes']:.1f}" for name, row in table.items())
    print(f"minutes per run: {minutes}")
    print(f"accuracy {args.dataset} ({budget_text(args, base)}, {seconds:.0f} s): "
          f"test top-1 teacher {acc('teacher (' + recipe['teacher'] + ')'):.2f}% | bestformer+KD "
          f"{acc('bestformer + distillation'):.2f}% | bestformer {acc('bestformer'):.2f}% | spikformer FP "
          f"{acc('spikformer (full precision)'):.2f}% | ratio bestformer+KD / spikformer {ratio:.3f}")


def _plot(table: dict, path: Path, title: str) -> None:
    curves = {name: (range(1, len(row["val_curve"]) + 1), row["val_curve"]) for name, row in table.items()}
    plot_curves(curves, path, title, "epoch")


def plot_curves(curves: dict, path: Path, title: str, xlabel: str) -> None:
    """One line per ``label: (xs, validation accuracies)``, written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
