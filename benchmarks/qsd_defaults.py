"""qsd_tiny with the authors' defaults (issue 21) against ours before 0.2.0, one change at a time.

    python benchmarks/qsd_defaults.py digits
    python benchmarks/qsd_defaults.py mnist --data-dir ../shared/data/mnist

Variants: ``authors`` (the defaults since 0.2.0: Q-SDSA without the token mean, LSQ steps initialised layer-wide
as the QSD code), ``token mean`` (ours for Q-SDSA), ``per-channel LSQ`` (ours for LSQ), ``ours before 0.2.0``
(both). Every variant trains with the same options and seed: digits, the ``digits`` recipe (5 epochs); MNIST, one
epoch on 14,000 training images at lr 5e-3 (README's qsd_tiny command), tested on all 10,000 test images. Prints
the table, writes ``benchmarks/results/qsd_defaults_<dataset>.json`` (merged with the variants already there, so
the variants can run in separate processes: ``--variants``) and prints last the ratio of the authors' defaults to
ours.
"""

from __future__ import annotations

import argparse
import json
import time

from accuracy import RESULTS
from bestformer.fileio import atomic_write_json
from bestformer.pipeline import resolve_config, train
from bestformer.training import load_recipe

VARIANTS = {
    "authors": {},
    "token mean": {"attn_token_mean": True},
    "per-channel LSQ": {"weight_bits": "lsq4c"},
    "ours before 0.2.0": {"attn_token_mean": True, "weight_bits": "lsq4c"},
}
SETTINGS = {
    "digits": ("digits", {}),  # as benchmarks/compare.py: the recipe without its model options or teacher
    "mnist": ("none", {"dataset": "mnist", "limit": 14000, "epochs": 1, "lr": 0.005, "warmup_lr": 0.0005,
                       "warmup_epochs": 0.1, "min_lr": 1e-5, "batch_size": 64, "time_steps": 4}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=tuple(SETTINGS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args()
    recipe, options = SETTINGS[args.dataset]
    shipped = load_recipe(recipe) if recipe != "none" else {}
    shipped.pop("model_args", None)
    path = RESULTS / f"qsd_defaults_{args.dataset}.json"
    for name in args.variants:
        t0 = time.perf_counter()
        cfg, _ = resolve_config("none", {**shipped, **options, "model": "qsd_tiny", "model_args": VARIANTS[name],
                                         "teacher": None, "time_steps": options.get("time_steps"),
                                         "data_dir": args.data_dir, "seed": args.seed, "threads": args.threads,
                                         "out": args.out, "name": f"qsd-{args.dataset}-{name.replace(' ', '_')}"})
        res = train(cfg)
        saved = json.loads(path.read_text()) if path.is_file() else {"runs": {}}  # another process may add too
        saved["runs"][name] = {"model_args": VARIANTS[name], "test": res.test["acc1"] if res.test else None,
                               "val": res.val["acc1"] if res.val else None,
                               "minutes": round((time.perf_counter() - t0) / 60, 2)}
        saved["options"] = {"recipe": recipe, **options, "seed": args.seed, "threads": args.threads}
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, saved)
    runs = saved["runs"]
    print(f"qsd_tiny on {args.dataset} ({recipe} recipe, seed {args.seed})")
    for name, r in runs.items():
        print(f"  {name:<18} test {r['test']:6.2f} %  val {r['val'] if r['val'] is None else round(r['val'], 2)}"
              f"  ({r['minutes']} min)")
    if "authors" in runs and "ours before 0.2.0" in runs:
        print(f"qsd_tiny {args.dataset}: authors' defaults / ours before 0.2.0 (test top-1): "
              f"{runs['authors']['test'] / runs['ours before 0.2.0']['test']:.3f}")


if __name__ == "__main__":
    main()
