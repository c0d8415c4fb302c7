"""Build the model zoo (issue 17) from training runs, and print its README table.

    bash benchmarks/zoo_train.sh                      # the training runs, into runs/zoo/ (about 1.5 h on 2 cores)
    python benchmarks/zoo.py build                    # pack them into src/bestformer/zoo/ and write the manifest
    python benchmarks/zoo.py table                    # the README's zoo table, from the manifest
    python benchmarks/zoo.py sizes                    # recount the size fields from the shipped weights

``build`` takes each entry's best checkpoint, writes it in the Hub layout with 1-bit weights as bits
(``bestformer.save_pretrained``), loads it back through the zoo and checks that it reproduces the run's own
recorded accuracy exactly on the full split (the run's evaluation settings), then measures the fixed slice the
tests re-evaluate (the first ``SLICE`` samples of the split in float64: the same on every CPU), and
records sizes, wall-clock, CPU and the exact command. Nothing is tuned here: the numbers are the runs'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

from bestformer.analysis.size import model_size
from bestformer.fileio import atomic_write_text
from bestformer.hardware import cpu_info
from bestformer.zoo import MANIFEST

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "zoo"
DATA = Path("../shared/data")
SLICE = 500
CIFAR_RUN = REPO / "benchmarks" / "results" / "cifar10_fast_60m"
CIFAR_COMMAND = ("bestformer train --recipe cifar10-fast --data-dir ../shared/data/cifar10/cifar10-train-jpeg.tar.gz "
                 "--time-budget 60m --name cifar10_fast_60m")
CONVERT = ("bestformer convert runs/zoo/csd_tiny-mnist/best.safetensors -o "
           "runs/zoo/csd_tiny-mnist/converted.safetensors --dataset mnist --data-dir ../shared/data/mnist --no-sweep")

#: a run started from another run's checkpoint (--init): its command, minutes and log follow that run's
FINE_TUNED = {"bestformer_tiny-mnist-ft": "bestformer_tiny-mnist"}
#: name -> (run folder, checkpoint in it, data folder, split the top-1 is on, default entry of its model)
ENTRIES: dict[str, tuple[Path, str, str | None, str, bool]] = {
    "bestformer_tiny.mnist": (RUNS / "bestformer_tiny-mnist-ft", "best.safetensors", "mnist", "test", True),
    "ann_tiny.mnist": (RUNS / "bestformer_tiny-mnist", "teacher/best.safetensors", "mnist", "test", True),
    "bestformer_tiny.digits": (RUNS / "bestformer_tiny-digits", "best.safetensors", None, "test", False),
    "ann_tiny.digits": (RUNS / "bestformer_tiny-digits", "teacher/best.safetensors", None, "test", False),
    "bestformer_tiny.nmnist": (RUNS / "bestformer_tiny-nmnist", "best.safetensors", "nmnist/nmnist-small.tar.gz",
                               "test", False),
    "ann_tiny.nmnist": (RUNS / "bestformer_tiny-nmnist", "teacher/best.safetensors", "nmnist/nmnist-small.tar.gz",
                        "test", False),
    "a2os2a_tiny.mnist": (RUNS / "a2os2a_tiny-mnist", "best.safetensors", "mnist", "test", True),
    "qsd_tiny.mnist": (RUNS / "qsd_tiny-mnist", "best.safetensors", "mnist", "test", True),
    # pretrained=True gives the class create_model builds (timm's rule): the trainable ANN, not the converted SNN
    "csd_tiny.mnist": (RUNS / "csd_tiny-mnist", "converted.safetensors", "mnist", "test", False),
    "csd_tiny.mnist_ann": (RUNS / "csd_tiny-mnist", "best.safetensors", "mnist", "test", True),
    "bestformer_cifar_fast.cifar10": (CIFAR_RUN, "best.safetensors", "cifar10/cifar10-train-jpeg.tar.gz", "val",
                                      True),
}


def cpu() -> tuple[str, str]:
    """(model name, family and the flags that matter for timings; a short name)."""
    info = cpu_info()
    return info.describe(), f"{info.cpus}-core {'AVX-512' if 'avx512f' in info.flags else 'AVX2'}"


def clean_log(text: str) -> str:
    """A console log without the progress bars' carriage-return redraws."""
    keep = []
    for line in re.split(r"[\r\n]", text):
        if not line.strip() or re.search(r"\d+%\|.*\|", line) or re.search(r"it/s\]|s/it\]", line):
            continue
        keep.append(line.rstrip())
    return "\n".join(keep) + "\n"


def _command(run: Path, name: str) -> str:
    if run == CIFAR_RUN:
        return CIFAR_COMMAND
    command = (RUNS / f"{run.name}.command").read_text().strip()
    if run.name in FINE_TUNED:
        command = f"{_command(RUNS / FINE_TUNED[run.name], name)}\n{command}"
    return f"{command}\n{CONVERT}" if name == "csd_tiny.mnist" else command


def _log(run: Path, teacher: bool) -> str:
    console = RUNS / f"{run.name}.log"
    if console.is_file():
        before = _log(RUNS / FINE_TUNED[run.name], teacher) if run.name in FINE_TUNED else ""
        return before + clean_log(console.read_text(errors="replace"))
    rows = (run / ("teacher/metrics.csv" if teacher else "metrics.csv")).read_text()
    return ("# The console output of this run was not kept; metrics.csv (reproduced below) is its per-epoch log.\n"
            + rows)


def build(args: argparse.Namespace) -> None:
    import bestformer
    from bestformer.pipeline import evaluate_saved, load_weights_spec
    from bestformer.zoo import ZOO_DIR, hub

    full_cpu, short_cpu = cpu()
    entries = []
    for name, (run, ckpt, data, split, default) in ENTRIES.items():
        if args.only and name not in args.only:
            continue
        path = run / ckpt
        if name == "csd_tiny.mnist" and not path.is_file():
            subprocess.run(CONVERT.split(), cwd=REPO, check=True)
        model, meta = load_weights_spec(path)
        if "config" not in meta:  # a converted model: the ANN run's config says what it was trained on
            import yaml

            meta["config"] = yaml.safe_load((run / "config.yaml").read_text())
            meta.setdefault("dataset", meta["config"]["dataset"])
        teacher = ckpt.startswith("teacher/")
        summary = json.loads((run / "summary.json").read_text())
        recorded = (summary["teacher"] if teacher else summary).get(split)
        model_name, tag = name.split(".", 1)
        data_dir = str(DATA / data) if data else None
        command = _command(run, name)
        folder = ZOO_DIR / name
        if folder.exists():
            shutil.rmtree(folder)
        hub.save_pretrained(model, folder, name=name, command=command, **{k: v for k, v in meta.items()
                                                                           if k not in ("model_name", "model_args",
                                                                                        "library_version")})
        source = run / ("teacher" if teacher else ".")
        shutil.copyfile(source / "metrics.csv", folder / "metrics.csv")
        shutil.copyfile(source / "config.yaml", folder / "train_config.yaml")
        (folder / "train.log").write_text(_log(run, teacher))
        zoo_model, header = bestformer.zoo.from_pretrained(folder)
        full = evaluate_saved(zoo_model, header["meta"], dataset=None, data_dir=data_dir, split=split)
        if name == "csd_tiny.mnist":
            recorded = None  # the converted model has no training run: its number is measured here
        if recorded is not None and abs(full["acc1"] - recorded["acc1"]) > 1e-9:
            raise SystemExit(f"{name}: the zoo model gives {full['acc1']:.4f}% on {split}, the run recorded "
                             f"{recorded['acc1']:.4f}%: the packing is not exact")
        count, top1 = bestformer.zoo.slice_accuracy(folder, data_dir, split, SLICE)  # not in the manifest yet
        weights = folder / hub.WEIGHTS
        minutes = (summary["teacher"] if teacher else summary).get("seconds", 0.0) / 60
        if run.name in FINE_TUNED:  # the run it started from
            minutes += json.loads((RUNS / FINE_TUNED[run.name] / "summary.json").read_text())["seconds"] / 60
        entries.append({
            "name": name, "model": model_name, "tag": tag, "default": default, "dataset": full["dataset"],
            "split": split, "top1": full["acc1"], "top5": full["acc5"], "count": full["count"],
            "eval": {"amp": full["amp"], "flip": full["flip"]},
            "slice": {"split": split, "limit": SLICE, "precision": "float64", "count": count, "top1": top1},
            "file": f"{name}/{hub.WEIGHTS}", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "file_bytes": weights.stat().st_size, "folder_bytes": sum(f.stat().st_size for f in folder.iterdir()),
            **size_fields(zoo_model),
            "train_minutes": round(minutes, 2), "cpu": full_cpu if run != CIFAR_RUN else CIFAR_CPU,
            "cpu_short": short_cpu if run != CIFAR_RUN else "2-core AVX-512",
            "command": command, "data": f"../shared/data/{data}" if data else "scikit-learn digits",
            "library_version": header["library_version"],
        })
        print(f"{name}: {full['acc1']:.2f}% {split} ({full['count']}), slice {top1:.2f}%, "
              f"{weights.stat().st_size / 1e3:.1f} kB")
    if args.only and MANIFEST.is_file():
        old = [e for e in json.loads(MANIFEST.read_text())["entries"] if e["name"] not in args.only]
        entries = sorted(old + entries, key=lambda e: list(ENTRIES).index(e["name"]))
    write_manifest(entries)
    total = sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file())
    print(f"zoo: {len(entries)} entries, {total / 1e6:.2f} MB on disk -> {MANIFEST}")


#: the CIFAR-10 run was made in the previous session, on the machine its docs name
CIFAR_CPU = "AMD EPYC (family 25 model 17, Zen 4), 2 cores, avx2 fma avx512f avx512_bf16 avx512_vnni avx512_vpopcntdq"


def size_fields(model: object) -> dict:
    """The manifest's size fields of a zoo model: the paper's convention (``model_size``'s default full-precision
    bits), every parameter, the 1-bit ones."""
    size = model_size(model, deploy=False)
    return {"paper_bytes": size.paper_bytes, "params": size.params, "binary_params": size.binary_params}


def write_manifest(entries: list[dict]) -> None:
    atomic_write_text(MANIFEST, json.dumps({"format": "bestformer-zoo", "format_version": 1, "entries": entries},
                                           indent=2) + "\n")


def sizes(_args: argparse.Namespace) -> None:
    """Recount the size fields of every entry from its shipped weights (after a change of the size convention,
    e.g. 0.2.0's 16-bit full precision), without the training runs."""
    import bestformer.zoo

    entries = json.loads(MANIFEST.read_text())["entries"]
    for e in entries:
        new = size_fields(bestformer.zoo.load_pretrained(e["name"])[0])
        changed = {k: (e[k], v) for k, v in new.items() if e[k] != v}
        e.update(new)
        print(f"{e['name']}: " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "unchanged"))
    write_manifest(entries)


def table(_args: argparse.Namespace) -> None:
    from bestformer.zoo import markdown_table

    print(markdown_table())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack the runs into the zoo and write the manifest")
    b.add_argument("--only", nargs="+", help="rebuild only these entries")
    b.set_defaults(func=build)
    sub.add_parser("sizes", help="recount the size fields from the shipped weights").set_defaults(func=sizes)
    sub.add_parser("table", help="print the README table").set_defaults(func=table)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
