"""The four systems side by side (issue 5): the tiny model of every family trained with one recipe and budget,
then profiled the same way, in one table.

    python benchmarks/compare.py digits
    python benchmarks/compare.py mnist --data-dir ../shared/data/mnist --budget 0.1

Families: BESTformer (1-bit weights, binary attention), Spikformer (full-precision spiking, the baseline),
A2OS2A (addition-only attention), QSD-Transformer (LSQ 4-bit weights, IE-LIF), CSDformer (the quantized ANN,
trained, then converted into its spike-driven model; the table's row is the converted model) and the ANN of the
BESTformer topology (ReLU, full precision, T = 1) as the reference. Every model is trained by
``bestformer.pipeline.train`` with the dataset's shipped recipe (``bestformer/recipes/<dataset>.yaml``, scaled by
``--budget`` as in ``benchmarks/accuracy.py``), without distillation so that every family gets the same training;
the recipe's model options (width, stem pooling, LIF charge) go to the families that share the BESTformer
backbone, the others keep their registered tiny defaults. The table reads the profile each run writes of its best
weights (``profile.json``: ``bestformer.analysis.profile_model`` on held-out batches; for CSDformer the converted
model is profiled the same way into ``profile_converted.json``): size in the paper's convention, SOPs, energy at 45 nm,
NS-ACE at the layers' own bit-widths. Prints the table, writes ``benchmarks/results/compare_<dataset>.json`` and
``.png``, and prints last the ratios of BESTformer to the full-precision Spikformer.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from accuracy import RESULTS, add_budget_arguments, budget_options, budget_text, checked
from bestformer import load_checkpoint
from bestformer.analysis.report import energy_str, si
from bestformer.convert import convert
from bestformer.pipeline import load_bundle, resolve_config, train, write_profile
from bestformer.training import load_recipe
from bestformer.training.engine import evaluate

#: family -> (model, takes the recipe's model options)
FAMILIES: dict[str, tuple[str, bool]] = {
    "BESTformer": ("bestformer_tiny", True),
    "Spikformer (FP)": ("spikformer_tiny", True),
    "A2OS2A": ("a2os2a_tiny", True),
    "QSD-Transformer": ("qsd_tiny", False),
    "CSDformer (converted)": ("csd_tiny", False),
    "ANN (reference)": ("ann_tiny", True),
}


def ann_options(options: dict[str, Any]) -> dict[str, Any]:
    """The recipe's model options without the LIF's (the ANN has no spiking neuron)."""
    return {k: v for k, v in options.items() if k != "neuron_kwargs"}


def profile_row(path: Path) -> dict[str, Any]:
    """The table's columns from a profile JSON (``bestformer.pipeline.write_profile``)."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the run could not profile its model (see its log)")
    prof = json.loads(path.read_text())
    by_bits = {int(b): n for b, n in prof["size"]["params_by_bits"].items()}
    low = sum(n for bits, n in by_bits.items() if bits <= 8)
    return {"params": prof["params"], "low_bit_params": low, "low_bit_share": low / prof["params"],
            "bits": {str(b): n for b, n in sorted(by_bits.items())}, "size_mb": prof["model_size_mb"],
            "size_bytes": prof["size"]["paper_bytes"], "macs": prof["macs"], "real_macs": prof["real_macs"],
            "sops": prof["sops"], "energy_pj": prof["energy_pj"], "ns_ace": prof["ns_ace"],
            "firing_rate": prof["mean_firing_rate"]}


def converted_row(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """CSDformer: convert the best ANN checkpoint at T = L with full delay (exact), test the spiking model and
    profile it as the run profiled the ANN (``profile_converted.json`` beside it)."""
    ann, _ = load_checkpoint(run_dir / "best.safetensors")
    snn = convert(ann)
    bundle = load_bundle(cfg, snn.time_steps)
    test = evaluate(snn, bundle.test, num_classes=bundle.num_classes, desc="test (converted)")
    print(write_profile(snn, bundle, run_dir / "profile_converted.json"))
    return {"test_acc": test["acc1"], "conversion": f"T = L = {snn.time_steps}, delay {snn.delay}",
            **profile_row(run_dir / "profile_converted.json")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=("digits", "mnist"))
    p.add_argument("--data-dir", default=None, help="dataset folder (MNIST IDX files)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES), metavar="FAMILY",
                   help=f"subset of: {', '.join(FAMILIES)}")
    add_budget_arguments(p)
    args = p.parse_args()
    base = budget_options(p, args, "compare")
    recipe = load_recipe(args.dataset)
    recipe_args = recipe.pop("model_args", {})  # given per family below (a recipe's mapping would merge in)
    t0 = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    for family in args.families:
        model_name, shared = FAMILIES[family]
        options = (ann_options(recipe_args) if model_name.startswith("ann_") else recipe_args) if shared else {}
        cfg, _ = resolve_config("none", {**recipe, **base, "name": model_name, "model": model_name, "teacher": None,
                                         "model_args": options, "time_steps": None})
        res = checked(train(cfg))
        row = {"model": model_name, "val_acc": res.val["acc1"] if res.val else None,
               "test_acc": res.test["acc1"] if res.test else None, "train_minutes": res.seconds / 60,
               "model_args": options}
        if model_name.startswith("csd_"):
            row.update(converted_row(res.run_dir, cfg), ann_test_acc=row["test_acc"])
        else:  # the run profiled its best weights on held-out batches
            row.update(profile_row(res.run_dir / "profile.json"))
        rows[family] = row
    seconds = time.perf_counter() - t0

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": args.dataset, "budget": args.budget, "options": base, "seconds": seconds,
            "torch_threads": torch.get_num_threads(), "results": rows}
    (RESULTS / f"compare_{args.dataset}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _plot(rows, RESULTS / f"compare_{args.dataset}.png", f"{args.dataset}, {budget_text(args, base)}")
    print(markdown_table(rows))
    print(f"compare {args.dataset} ({budget_text(args, base)}, {seconds:.0f} s)")
    if {"BESTformer", "Spikformer (FP)"} <= rows.keys():
        b, s = rows["BESTformer"], rows["Spikformer (FP)"]
        print(f"BESTformer / Spikformer (FP): test accuracy {b['test_acc'] / s['test_acc']:.3f}, size "
              f"{b['size_bytes'] / s['size_bytes']:.3f}, energy {b['energy_pj'] / s['energy_pj']:.3f}, "
              f"NS-ACE {b['ns_ace'] / s['ns_ace']:.3f}")


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    head = ("| family | model | test acc | params | 1-/low-bit share | size (paper conv.) | SOPs | energy | NS-ACE "
            "| firing rate |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for family, r in rows.items():
        bits = ", ".join(f"{b}b" for b in r["bits"] if int(b) <= 8) or "-"
        fr = "-" if r["firing_rate"] is None else f"{r['firing_rate']:.3f}"
        lines.append(f"| {family} | {r['model']} | {r['test_acc']:.2f}% | {si(r['params'])} | "
                     f"{100 * r['low_bit_share']:.1f}% ({bits}) | {si(r['size_bytes'], 'B')} | {si(r['sops'])} | "
                     f"{energy_str(r['energy_pj'])} | {si(r['ns_ace'])} | {fr} |")
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, r in rows.items():
        ax.scatter(r["energy_pj"] / 1e3, r["test_acc"], s=30 + r["size_bytes"] / 1e3)
        ax.annotate(family, (r["energy_pj"] / 1e3, r["test_acc"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("energy per sample (nJ, 45 nm; log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(textwrap.fill(f"tiny models, {title} (marker area ~ size)", 100), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
