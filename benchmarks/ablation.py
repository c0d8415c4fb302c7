"""The BESTformer paper's Table 4 (ablation of the Coupled Information Enhancement) on real data:

    baseline        1-bit weights, standard residuals, one head, no distillation
    +RF             the reversible connection of Eq. 12 (one head on the mean of the two streams)
    +IED            information-enhanced distillation, Eq. 15 (two heads on the residual stream)
    +RF +IED        both (classification head on X^{S,0}, distillation head on X^{S,1}: the paper's best)

each over several seeds, mean and standard deviation of the validation and test accuracy.

    python benchmarks/ablation.py digits --seeds 3
    python benchmarks/ablation.py mnist --data-dir ../shared/data/mnist --budget 0.05
    python benchmarks/ablation.py cifar10 --recipe cifar10-fast --set time_budget=null --set epochs=20 \
        --set warmup_epochs=0 --seeds 3 \
        --data-dir ../shared/data/cifar10/cifar10-train-jpeg.tar.gz --results runs/table4.json --runs 1
                                  # issue 21: one run of the 60-minute budget's 7,040 steps per call, resumable
    python benchmarks/ablation.py cifar10 --data-dir ../shared/data/cifar10/cifar10-train-jpeg.tar.gz \
        --model bestformer_tiny --budget 0.08 --set epochs=3 --set batch_size=64 --set accum_steps=1 \
        --set lr=0.005 --set warmup_lr=0.0005 --set warmup_epochs=0.3 --set cooldown_epochs=0 --set mixup=0 \
        --set rand_augment=null --set random_erasing=0 --set teacher_epochs=6     # the 2-core CPU run, ~1 hour

Options come from the dataset's shipped recipe (``cifar10``: the paper's 400-epoch recipe on bestformer_4_384);
``--budget B`` scales its epochs and, below 1, the samples per split, so a CPU run fits in about an hour while
``--budget 1`` is the full recipe for a GPU. ``--limit``, ``--seed``, ``--threads``, ``--out`` and ``--set`` are
those of ``benchmarks/accuracy.py``: ``--set KEY=VALUE`` (repeatable) overrides any recipe key after the
budget (e.g. a CPU batch size and learning rate for ``bestformer_tiny``); the table names every override. CIFAR-10
here has no test split (the JPEG training split only; its test split is held out), so its table reports validation
accuracy only. One ANN teacher (the counterpart of the student's size, ``ann_*``) is trained first, as a run of
its own with the config a distilled run would give it (the first seed), and shared by the distilled variants: no
variant's time budget pays for it. Prints the table (with the budget), then each variant against the
baseline (the difference of the means; whether it is better or worse by more than the seed spread, the larger of
the two standard deviations, or within it; and seed by seed), and one line of results, the ratio of the full
method to the baseline last; writes ``benchmarks/results/ablation_<dataset>.json`` and ``.png`` (with ``--results
FILE``: beside FILE, as ``ablation_<dataset>_<FILE's stem>``).

``--recipe NAME`` uses another shipped recipe than the dataset's (``cifar10-fast``). ``--results FILE`` makes the
benchmark incremental: every finished (variant, seed) run is added to FILE at once, a later call with the same
options skips what FILE holds (and refuses FILE if its options differ), and ``--runs N`` stops after N new runs.
So a table of 12 one-hour runs can be built over several sessions; the table and plot are written when every run
is in. With ``--results FILE`` the run folders are ``runs/<FILE's stem>/<variant>-s<seed>``: a run cut off by the end
of a session (SIGTERM writes its resume state) is continued exactly where it stopped by the next call, and a
finished run whose result is not in FILE yet is read back from its folder. The options are recorded there too
(``ledger_identity.json``): folders of other options are refused, never read back. Two calls may build one ledger
at once (on 2 cores, each ``--threads 1`` trains about 1.2x more steps per second in all than one call on both): a
run another call is training (its folder locked) is skipped, and each finished run is merged into FILE as it is
then. FILE also keeps the teacher's validation accuracy: when its checkpoint is gone (the run folders lost), the
teacher is trained again with the first seed's config, and a teacher that does not reach the same accuracy is said
to differ, since the distilled runs before it had the other one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from accuracy import RESULTS, add_budget_arguments, budget_options, budget_text, checked
from bestformer.analysis.report import save_png
from bestformer.errors import ConfigError
from bestformer.fileio import atomic_write_json
from bestformer.pipeline import resolve_config, resume, train
from bestformer.training import TrainConfig, load_recipe

T = TypeVar("T")

#: variant -> (model options, distilled)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "baseline": ({"reversible": False, "distill_head": False}, False),
    "+RF": ({"reversible": True, "distill_head": False}, False),
    "+IED": ({"reversible": False, "distill_head": True}, True),
    "+RF +IED": ({"reversible": True, "distill_head": True}, True),
}


def run_once(cfg: TrainConfig) -> dict:
    """The result of ``cfg``'s run: read back from its folder when an earlier call finished it, continued from its
    resume state when an earlier call was cut off, else trained. ``{"val", "test", "minutes", "run_dir"}``."""
    folder = Path(cfg.out) / cfg.name
    summary = folder / "summary.json"
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    if done.get("status") == "finished":
        seconds = done["seconds"]
        val, test = done.get("val"), done.get("test")
    else:
        res = checked(resume(folder) if folder.is_dir() else train(cfg))
        seconds, val, test = res.seconds, res.val, res.test
    return {"val": val["acc1"] if val else None, "test": test["acc1"] if test else None,
            "minutes": round(seconds / 60, 2), "run_dir": folder}


def train_teacher(cfg: TrainConfig) -> tuple[str, float | None]:
    """The shared teacher, trained first as its own run with the config a distilled run would give it
    (``TrainConfig.teacher_config``); returns its best checkpoint and validation accuracy."""
    tcfg = cfg.teacher_config(str(cfg.teacher), None).replace(name=f"teacher-{cfg.name}")
    res = run_once(tcfg)
    return str(res["run_dir"] / "best.safetensors"), res["val"]


def in_use(folder: Path) -> bool:
    """Whether another process holds the run lock of ``folder`` (``RunFolder.lock``): a run another call of this
    script is training now, left to it. (Held here for a moment: a run taking the lock meanwhile waits for it.)"""
    lock = folder / ".lock"
    if not lock.is_file():
        return False
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to look at
        return False
    with open(lock, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def read_ledger(ledger: Path, identity: dict) -> dict:
    """The ledger's contents (``{}`` before its first run), refused if it holds runs of other options."""
    saved = json.loads(ledger.read_text()) if ledger.is_file() else {}
    if saved and saved["identity"] != identity:
        raise SystemExit(f"{ledger} holds runs of other options ({saved['identity']}); give another --results")
    return saved


def unless_elsewhere(folder: Path, busy: str, taken: str, work: Callable[[], T]) -> T | None:
    """``work()`` (which takes ``folder``'s run lock), or ``None`` when another call holds that folder: seen before
    (``busy`` is printed) or when its lock refused this call in between (``taken``)."""
    if in_use(folder):
        print(busy)
        return None
    try:
        return work()
    except ConfigError:
        if not in_use(folder):
            raise
        print(taken)
        return None


def record(ledger: Path, identity: dict, teacher: dict, name: str | None = None,
           entry: dict | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Add one finished run (``entry`` of variant ``name``) and the shared teacher (``teacher_checkpoint``,
    ``teacher_val``) to the ledger as the file is now, under a lock, so that two calls training at once (each
    ``--threads 1`` on a 2-core machine) both keep their runs; returns the ledger's runs and teacher."""
    import fcntl

    with open(Path("runs") / ledger.stem / "ledger.lock", "a") as lock:  # the run root (main)
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = read_ledger(ledger, identity)
        runs = {n: list(saved.get("runs", {}).get(n, [])) for n in VARIANTS}
        if name is not None and not any(r["seed"] == entry["seed"] for r in runs[name]):
            runs[name].append(entry)
        kept = {k: saved.get(k) for k in ("teacher_checkpoint", "teacher_val")}  # unless this call trained one
        kept.update({k: v for k, v in teacher.items() if v is not None})
        atomic_write_json(ledger, {"identity": identity, "runs": runs, **kept})
    return runs, kept


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def against_baseline(results: dict[str, list[dict]], key: str) -> dict[str, dict]:
    """Each variant against the baseline, the question of the paper's Table 4: the difference of the means
    (points), the seed spread (the larger of the two sample standard deviations), the verdict (``"better"`` or
    ``"worse"`` by more than that spread, ``"within"`` it, or ``None`` when a side has fewer than 2 seeds: no
    spread to compare with), and the differences seed by seed (same seed: same initialisation and data order)."""
    base = {r["seed"]: r[key] for r in results["baseline"]}
    base_mean, base_std = mean_std(list(base.values()))
    out = {}
    for name, runs in results.items():
        if name == "baseline":
            continue
        mean, std = mean_std([r[key] for r in runs])
        paired = {r["seed"]: r[key] - base[r["seed"]] for r in sorted(runs, key=lambda r: r["seed"])
                  if r["seed"] in base}
        diff, spread = mean - base_mean, max(std, base_std)
        verdict = None if min(len(runs), len(base)) < 2 else \
            "within" if abs(diff) <= spread else "better" if diff > 0 else "worse"
        out[name] = {"diff": diff, "spread": spread, "verdict": verdict, "paired": paired,
                     "better_seeds": sum(d > 0 for d in paired.values())}
    return out


VERDICT_TEXT = {"better": "better by more than the spread", "worse": "worse by more than the spread",
                "within": "within the spread", None: "no spread to compare with (fewer than 2 seeds)"}


def verdict_lines(verdicts: dict[str, dict]) -> list[str]:
    """One line per variant: ``+RF vs baseline: +0.42 points, seed spread 0.80: within the spread; ...``."""
    return [f"{name} vs baseline: {v['diff']:+.2f} points, seed spread {v['spread']:.2f}: "
            f"{VERDICT_TEXT[v['verdict']]}; better on "
            f"{v['better_seeds']} of {len(v['paired'])} seeds "
            f"({', '.join(f'seed {s} {d:+.2f}' for s, d in v['paired'].items())})"
            for name, v in verdicts.items()]


def claim_run_root(root: Path, identity: dict) -> None:
    """A ledger's run folders hold runs of its options only: the options are written beside them at first use,
    and a ledger of other options whose folders would be the same (same file name elsewhere, or a deleted ledger
    run again with new options) is refused instead of reading those runs back."""
    mark = root / "ledger_identity.json"
    if mark.is_file():
        saved = json.loads(mark.read_text())
        if saved != identity:
            raise SystemExit(f"{root} holds runs of other options ({saved}); give --results another file name")
    else:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(mark, identity)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=("cifar10", "digits", "mnist"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant, from --seed on (>= 3 for the table)")
    p.add_argument("--model", default=None, help="override the recipe's model (e.g. bestformer_tiny for cifar10)")
    p.add_argument("--recipe", default=None, help="a shipped recipe other than the dataset's (e.g. cifar10-fast)")
    p.add_argument("--results", default=None, help="incremental: add each finished run to this JSON file, skip the "
                                                   "runs it already holds")
    p.add_argument("--runs", type=int, default=None, help="with --results: stop after this many new runs")
    add_budget_arguments(p)
    args = p.parse_args()
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.runs is not None and not args.results:
        p.error("--runs needs --results (the ledger that keeps the finished runs for the next call)")
    base = budget_options(p, args, "ablation")
    if args.model:
        base["model"] = args.model
    recipe_name = args.recipe or args.dataset
    recipe = load_recipe(recipe_name)
    model = base.get("model", recipe["model"])
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    teacher_ckpt: str | None = None
    teacher: dict = {}  # what the ledger keeps of the shared teacher
    ledger = Path(args.results) if args.results else None
    identity = {"dataset": args.dataset, "recipe": recipe_name, "budget": args.budget, "model": model,
                "overrides": {k: v for k, v in args.overrides}, "limit": args.limit}
    if ledger is not None:  # stable run folders, so that a later call continues a run cut off
        base["out"] = str(Path("runs") / ledger.stem)
        claim_run_root(Path(base["out"]), identity)
    if ledger is not None and ledger.is_file():
        saved = read_ledger(ledger, identity)
        results = {name: saved["runs"].get(name, []) for name in VARIANTS}  # the table's order, not the file's
        teacher_ckpt = saved.get("teacher_checkpoint")
        teacher["teacher_val"] = saved.get("teacher_val")
    new_runs = 0
    first_distilled = next(name for name, (_, distilled) in VARIANTS.items() if distilled)

    def config_for(name: str, seed: int, teacher_arg: str | None) -> TrainConfig:
        model_args = {**recipe.get("model_args", {}), **base.get("model_args", {}), **VARIANTS[name][0]}
        return resolve_config(recipe_name, {
            **base, "seed": seed, "name": f"{name.replace(' ', '').replace('+', 'p')}-s{seed}",
            "model_args": model_args, "teacher": teacher_arg})[0]

    if teacher_ckpt is not None and not Path(teacher_ckpt).is_file():  # run folders lost (a new checkout)
        print(f"the ledger's teacher {teacher_ckpt} is gone: trained again with the same config before the next "
              "distilled run (its accuracy is compared with the ledger's)")
        teacher_ckpt = None
    for seed in range(args.seed, args.seed + args.seeds):
        for name, (_, distilled) in VARIANTS.items():
            if any(r["seed"] == seed for r in results[name]):
                continue  # in the ledger already
            if args.runs is not None and new_runs >= args.runs:
                break
            arch_or_ckpt = (teacher_ckpt or model.replace("bestformer", "ann")) if distilled else None
            cfg = config_for(name, seed, arch_or_ckpt)
            folder, busy = Path(cfg.out) / cfg.name, f"{name}, seed {seed}: trained by another call now (its folder " \
                "is locked); skipped"
            if in_use(folder):  # before the teacher: nothing to train for a run another call holds
                print(busy)
                continue
            if distilled and teacher_ckpt is None:
                # the ANN counterpart of the student's size, trained once with the first seed's config, then shared
                first = config_for(first_distilled, args.seed, arch_or_ckpt)
                trained = unless_elsewhere(
                    Path(first.out) / f"teacher-{first.name}",
                    f"{name}, seed {seed}: the shared teacher is trained by another call now; skipped",
                    f"{name}, seed {seed}: another call took the shared teacher first; skipped",
                    partial(train_teacher, first))
                if trained is None:
                    continue
                teacher_ckpt, val = trained
                cfg = cfg.replace(teacher=teacher_ckpt)
                if teacher.get("teacher_val") not in (None, val):  # the runs before it had another teacher
                    print(f"the teacher trained again reached {val:.2f} % validation, the ledger's "
                          f"{teacher['teacher_val']:.2f} %: its distilled runs have a different teacher")
                teacher = {"teacher_checkpoint": teacher_ckpt, "teacher_val": val}
                if ledger is not None:  # kept at once: a later call reuses it
                    results, teacher = record(ledger, identity, teacher)
            res = unless_elsewhere(folder, busy, f"{name}, seed {seed}: another call took it first; skipped",
                                   partial(run_once, cfg))
            if res is None:
                continue
            entry = {"seed": seed, "val": res["val"], "test": res["test"], "minutes": res["minutes"]}
            new_runs += 1
            if ledger is None:
                results[name].append(entry)
            else:  # merged into the file as it is now: another call may have added runs since this one read it
                results, teacher = record(ledger, identity, teacher, name, entry)
    missing = [(n, s) for s in range(args.seed, args.seed + args.seeds) for n in VARIANTS  # the order runs go in
               if not any(r["seed"] == s for r in results[n])]
    if missing:
        print(f"{len(missing)} of {len(VARIANTS) * args.seeds} runs still to do (next: {missing[0][0]}, seed "
              f"{missing[0][1]}); {ledger} holds the rest: run the same command again")
        return

    seeds = range(args.seed, args.seed + args.seeds)  # the table is of these seeds, whatever else the ledger holds
    results = {name: [r for r in runs if r["seed"] in seeds] for name, runs in results.items()}
    twice = [name for name, runs in results.items() if len({r["seed"] for r in runs}) != len(runs)]
    if twice:  # the table would average both while the paired differences keep one
        raise SystemExit(f"{ledger}: {twice[0]} holds a seed twice; keep one run per variant and seed")
    seconds = time.perf_counter() - t0
    if ledger is not None:  # the runs of the table, over every call that built the ledger (the teacher's apart)
        seconds = 60 * sum(r.get("minutes", 0.0) for runs in results.values() for r in runs)
    summary = {}
    for name, runs in results.items():
        row = {"val": mean_std([r["val"] for r in runs])}
        if all(r["test"] is not None for r in runs):
            row["test"] = mean_std([r["test"] for r in runs])
        summary[name] = row
    budget_txt = f"{budget_text(args, base)}, model {model}, {args.seeds} seeds, {seconds / 60:.1f} min"
    lines = [f"Table 4 on {args.dataset} ({budget_txt})", f"{'variant':<10}  {'val acc (%)':>16}  {'test acc (%)':>16}"]
    for name, row in summary.items():
        test = f"{row['test'][0]:6.2f} +- {row['test'][1]:5.2f}" if "test" in row else f"{'-':>16}"
        lines.append(f"{name:<10}  {row['val'][0]:6.2f} +- {row['val'][1]:5.2f}  {test}")
    key = "test" if "test" in summary["baseline"] else "val"
    verdicts = against_baseline(results, key)
    lines += verdict_lines(verdicts)
    print("\n".join(lines))

    # a ledger's table goes beside it, named after it, so that it does not replace the dataset's one-call table
    folder, stem = (RESULTS, f"ablation_{args.dataset}") if ledger is None else \
        (ledger.parent, f"ablation_{args.dataset}_{ledger.stem}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{stem}.json", {
        "dataset": args.dataset, "budget": args.budget, "options": base, "seeds": args.seeds, "seconds": seconds,
        "runs": results, "summary": summary, "against_baseline": verdicts, "teacher_checkpoint": teacher_ckpt,
        "teacher_val": teacher.get("teacher_val"), "table": lines})
    _plot(summary, results, folder / f"{stem}.png", lines[0])
    ratio = summary["+RF +IED"][key][0] / summary["baseline"][key][0]
    print(f"ablation {args.dataset} ({key} top-1, mean of {args.seeds} seeds): "
          + " | ".join(f"{n} {r[key][0]:.2f}" for n, r in summary.items())
          + f" | ratio (+RF +IED) / baseline {ratio:.3f}")


def _plot(summary: dict, results: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean and standard deviation per variant (bars), each seed's run as a dot on its bar."""
    from matplotlib.figure import Figure

    names = list(summary)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    keys = [key for key in ("val", "test") if all(key in summary[n] for n in names)]
    for i, key in enumerate(keys):
        xs = [j + 0.38 * i for j in range(len(names))]
        ax.bar(xs, [summary[n][key][0] for n in names], 0.36, yerr=[summary[n][key][1] for n in names],
               capsize=4, label=key)
        for x, n in zip(xs, names):
            ax.plot([x] * len(results[n]), [r[key] for r in results[n]], "k.", markersize=4)
    ax.set_xticks([j + 0.19 * (len(keys) - 1) for j in range(len(names))], names)  # under the bar (pair)
    lows = [summary[n]["val"][0] for n in names]
    ax.set_ylim(max(0.0, min(lows) - 10), 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)


if __name__ == "__main__":
    main()
