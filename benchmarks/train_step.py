"""Training-step speed and peak memory: the fast path against the plain path, side by side (issue 7).

Each configuration runs in a fresh Python process (so that its peak RSS is its own) doing warm-up steps, then timed
steps of forward + backward + AdamW on random images; configurations are interleaved round by round so that load
from other processes falls on all of them alike. Configurations:

- ``plain``: the reference path: ``set_backend("plain")`` (one autograd node per LIF operation and step), spikes
  saved as float32, default (NCHW) memory format.
- ``fused``: the library default: fused LIF kernels (numba on CPU, Triton on CUDA), spikes saved as bits
  (``spike_packing``), plus channels-last activations on CPU (oneDNN's fast convolution layout).
- ``fused+ckpt``: ``fused`` with activation checkpointing per encoder block (``set_grad_checkpointing``).

Peak memory: CPU: the process's peak resident set size (``ru_maxrss``, includes Python, torch and the model);
CUDA: ``torch.cuda.max_memory_allocated`` during the timed steps. Ratios (fast / plain) are printed last.

    python benchmarks/train_step.py                       # bestformer_4_384, T=4, 32x32, batch 32 (128 on CUDA)
    python benchmarks/train_step.py --batch 8 --steps 2   # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("plain", "fused", "fused+ckpt")


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    from bestformer import create_model
    from bestformer.neurons import set_backend

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = args.worker
    set_backend("plain" if cfg == "plain" else "fused")
    model = create_model(args.model, time_steps=args.time_steps, img_size=args.img_size).to(device).train()
    model.set_spike_packing(cfg != "plain")
    model.set_grad_checkpointing(cfg == "fused+ckpt")
    # channels-last input: every stem convolution, BatchNorm, LIF and pooling then keeps that layout
    channels_last = cfg != "plain" and device.type == "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, model.in_channels, args.img_size, args.img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    rss_model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> float:
        out = model(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs) / len(outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises CUDA

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu, losses = [], [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": cfg, "images_per_s": args.batch / statistics.median(wall),
            "step_s": statistics.median(wall), "cpu_s_per_step": statistics.median(cpu), "peak_mb": peak_mb,
            "rss_after_build_mb": rss_model_mb, "loss": losses[-1], "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bestformer_4_384")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 32 on CPU, 128 on CUDA)")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--time-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (a fresh process each time)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run every configuration with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (peak RSS then follows "
                         "live memory instead of what the allocator keeps; default: the allocator's defaults)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train_step"), help="folder for JSON and PNG")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch is None:
        args.batch = 128 if args.device == "cuda" else 32
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from tqdm import tqdm

    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or "plain" not in configs:
        sys.exit(f"--configs must include 'plain' and name only {', '.join(CONFIGS)}; got {args.configs!r}")
    base = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--img-size",
            str(args.img_size), "--time-steps", str(args.time_steps), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--device", args.device]
    results: dict[str, list[dict]] = {c: [] for c in configs}
    jobs = [(r, c) for r in range(args.rounds) for c in configs]
    started = time.time()
    load_before = os.getloadavg()
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    for _, cfg in tqdm(jobs, desc="train-step benchmark", unit="run"):
        proc = subprocess.run([*base, "--worker", cfg], capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            sys.exit(f"configuration {cfg} failed:\n{proc.stderr[-3000:]}")
        results[cfg].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    summary = {}
    for cfg, runs in results.items():
        summary[cfg] = {k: statistics.median(r[k] for r in runs)
                        for k in ("images_per_s", "step_s", "cpu_s_per_step", "peak_mb", "rss_after_build_mb")}
        summary[cfg]["loss"] = runs[-1]["loss"]
    conditions = {"model": args.model, "batch": args.batch, "img_size": args.img_size, "time_steps": args.time_steps,
                  "steps": args.steps, "rounds": args.rounds, "device": args.device, "cpus": os.cpu_count(),
                  "threads": results["plain"][0]["threads"], "load_avg_1min_before_after": [load_before[0],
                                                                                                 load_after[0]],
                  "wall_s": round(time.time() - started, 1), "malloc_mmap_threshold": args.malloc_mmap_threshold}
    if args.device == "cuda":
        import torch

        conditions["gpu"] = torch.cuda.get_device_name(0)
    mem_label = "max allocated MB" if args.device == "cuda" else "peak RSS MB"
    where = conditions.get("gpu", f"{conditions['threads']} threads")
    print(f"\n{args.model}, batch {args.batch}, T={args.time_steps}, {args.img_size}x{args.img_size}, {args.device} "
          f"({where}), {args.steps} timed steps x "
          f"{args.rounds} round(s); load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
          + (f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else ""))
    print(f"{'config':<12}{'images/s':>10}{'s/step':>9}{'cpu s/step':>12}{mem_label:>18}{'loss':>9}")
    for cfg, s in summary.items():
        print(f"{cfg:<12}{s['images_per_s']:>10.2f}{s['step_s']:>9.2f}{s['cpu_s_per_step']:>12.2f}"
              f"{s['peak_mb']:>18.0f}{s['loss']:>9.4f}")
    plain = summary["plain"]
    ratios = {cfg: {"speed": s["images_per_s"] / plain["images_per_s"], "memory": s["peak_mb"] / plain["peak_mb"]}
              for cfg, s in summary.items() if cfg != "plain"}
    args.out.mkdir(parents=True, exist_ok=True)
    from bestformer.fileio import atomic_write_json

    atomic_write_json(args.out / "train_step.json", {"conditions": conditions, "summary": summary,
                                                      "ratios": ratios, "runs": results})
    _plot(summary, mem_label, conditions, args.out / "train_step.png")
    print(f"wrote {args.out / 'train_step.json'} and {args.out / 'train_step.png'}")
    for cfg, r in ratios.items():
        print(f"ratio {cfg} / plain: images/s x{r['speed']:.2f}, peak memory x{r['memory']:.2f}")


def _plot(summary: dict, mem_label: str, conditions: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "images_per_s", "images / s"), (axes[1], "peak_mb", mem_label)):
        vals = [summary[n][key] for n in names]
        ax.bar(names, vals, color=["#999999"] + ["#2a7ab0"] * (len(names) - 1))
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}" if key == "images_per_s" else f"{v:.0f}", ha="center", va="bottom")
        ax.set_ylabel(label)
    fig.suptitle(f"{conditions['model']} train step, batch {conditions['batch']}, {conditions['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
