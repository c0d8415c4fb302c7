"""The BESTformer paper's Table 4 (ablation of the Coupled Information Enhancement) on real data:

    baseline        1-bit weights, standard residuals, one head, no distillation
    +RF             the reversible connection of Eq. 12 (one head on the mean of the two streams)
    +IED            information-enhanced distillation, Eq. 15 (two heads on the residual stream)
    +RF +IED        both (classification head on X^{S,0}, distillation head on X^{S,1}: the paper's best)

each over several seeds, mean and standard deviation of the validation and test accuracy.

    python benchmarks/ablation.py digits --seeds 3
    python benchmarks/ablation.py mnist --data-dir ../shared/data/mnist --budget 0.05
    python benchmarks/ablation.py cifar10 --data-dir ../shared/data/cifar10/cifar10-train-jpeg.tar.gz --budget 0.01

Options come from the dataset's shipped recipe (``cifar10``: the paper's 400-epoch recipe on bestformer_4_384);
``--budget B`` scales its epochs and, below 1, the samples per split, so a CPU run fits in about an hour while
``--budget 1`` is the full recipe for a GPU. CIFAR-10 here has no test split (the JPEG training split only; its
test split is held out), so its table reports validation accuracy only. One ANN teacher (the counterpart of the
student's size, ``ann_*``) is trained first with the first seed and shared by the distilled variants. Prints the
table (with the budget) and one line of results, the ratio of the full method to the baseline last; writes
``benchmarks/results/ablation_<dataset>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from bestformer.training import load_recipe, resolve_config, train

RESULTS = Path(__file__).resolve().parent / "results"
#: variant -> (model options, distilled)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "baseline": ({"reversible": False, "distill_head": False}, False),
    "+RF": ({"reversible": True, "distill_head": False}, False),
    "+IED": ({"reversible": False, "distill_head": True}, True),
    "+RF +IED": ({"reversible": True, "distill_head": True}, True),
}
FULL_SIZES = {"digits": 1797, "mnist": 70000, "cifar10": 50000}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(FULL_SIZES))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--budget", type=float, default=1.0, help="scale of epochs and subset (1: the full recipe)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (>= 3 for the table)")
    p.add_argument("--model", default=None, help="override the recipe's model (e.g. bestformer_tiny for cifar10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args()
    if not args.budget > 0 or args.seeds < 1:
        p.error("--budget must be > 0 and --seeds >= 1")
    recipe = load_recipe(args.dataset)
    epochs = max(1, math.ceil(recipe["epochs"] * args.budget))
    base = {"epochs": epochs, "data_dir": args.data_dir, "warmup_epochs": min(recipe.get("warmup_epochs", 0),
                                                                              epochs - 1),
            "cooldown_epochs": math.ceil(recipe.get("cooldown_epochs", 0) * args.budget),
            "mixup_off_epoch": math.ceil(recipe.get("mixup_off_epoch", 0) * args.budget),
            "teacher_epochs": max(1, math.ceil(recipe.get("teacher_epochs", recipe["epochs"]) * args.budget))}
    if args.model:
        base["model"] = args.model
    if args.threads:
        base["threads"] = args.threads
    if args.budget < 1:
        base["limit"] = max(200, math.ceil(FULL_SIZES[args.dataset] * args.budget))
    model = args.model or recipe["model"]
    root = Path(args.out) / f"ablation-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    teacher_ckpt: str | None = None
    for seed in range(args.seeds):
        for name, (options, distilled) in VARIANTS.items():
            # the ANN counterpart of the student's size, trained once (first seed), then shared
            teacher = (teacher_ckpt or model.replace("bestformer", "ann")) if distilled else None
            cfg, _ = resolve_config(args.dataset, {
                **base, "seed": seed, "out": str(root), "name": f"{name.replace(' ', '').replace('+', 'p')}-s{seed}",
                "model_args": {**recipe.get("model_args", {}), **options}, "teacher": teacher})
            res = train(cfg)
            if res.status == "interrupted":  # partial numbers would be wrong: stop here
                raise SystemExit(f"interrupted; continue that run with: bestformer train --resume {res.run_dir}")
            if distilled and teacher_ckpt is None:
                teacher_ckpt = str(res.run_dir / "teacher" / "best.safetensors")
            results[name].append({"seed": seed, "val": res.val["acc1"] if res.val else None,
                                  "test": res.test["acc1"] if res.test else None})
    seconds = time.perf_counter() - t0

    summary = {}
    for name, runs in results.items():
        row = {"val": mean_std([r["val"] for r in runs])}
        if all(r["test"] is not None for r in runs):
            row["test"] = mean_std([r["test"] for r in runs])
        summary[name] = row
    budget_txt = (f"budget {args.budget:g}: {epochs} epochs (+{base['cooldown_epochs']} cool-down)"
                  + (f", at most {base['limit']} samples per split" if "limit" in base else ", full data")
                  + f", model {model}, {args.seeds} seeds, {seconds / 60:.1f} min")
    lines = [f"Table 4 on {args.dataset} ({budget_txt})", f"{'variant':<10}  {'val acc (%)':>16}  {'test acc (%)':>16}"]
    for name, row in summary.items():
        test = f"{row['test'][0]:6.2f} +- {row['test'][1]:5.2f}" if "test" in row else f"{'-':>16}"
        lines.append(f"{name:<10}  {row['val'][0]:6.2f} +- {row['val'][1]:5.2f}  {test}")
    print("\n".join(lines))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ablation_{args.dataset}.json").write_text(json.dumps(
        {"dataset": args.dataset, "budget": args.budget, "options": base, "seeds": args.seeds, "seconds": seconds,
         "runs": results, "summary": summary, "teacher_checkpoint": teacher_ckpt, "table": lines}, indent=2) + "\n")
    _plot(summary, RESULTS / f"ablation_{args.dataset}.png", lines[0])
    key = "test" if "test" in summary["baseline"] else "val"
    ratio = summary["+RF +IED"][key][0] / summary["baseline"][key][0]
    print(f"ablation {args.dataset} ({key} top-1, mean of {args.seeds} seeds): "
          + " | ".join(f"{n} {r[key][0]:.2f}" for n, r in summary.items())
          + f" | ratio (+RF +IED) / baseline {ratio:.3f}")


def _plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, key in enumerate(("val", "test")):
        if all(key in summary[n] for n in names):
            xs = [j + 0.38 * i for j in range(len(names))]
            ax.bar(xs, [summary[n][key][0] for n in names], 0.36, yerr=[summary[n][key][1] for n in names],
                   capsize=4, label=key)
    ax.set_xticks([j + 0.19 for j in range(len(names))], names)
    lows = [summary[n]["val"][0] for n in names]
    ax.set_ylim(max(0.0, min(lows) - 10), 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
