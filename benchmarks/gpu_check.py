"""GPU readiness check: validates and times the CUDA paths in one prepared run of at most 9 minutes.

    make gpu-check-prepare                 # here: the CIFAR-10 archive into .device-data/, wheels the GPU image lacks
    make gpu-check                         # there (any CUDA machine): every stage, results into $OUT (gpu-check/)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc    # every stage on the CPU at tiny sizes (CI)

Stages, each in its own process with its own timeout, all within 530 s (a failing stage does not stop the next; a
stage that the total leaves no time for is recorded as skipped):

1. ``env``: GPU name, driver, CUDA, torch, triton and Python versions (``nvidia-smi`` when present).
2. ``cuda_tests``: ``tests/test_kernels.py`` (the Triton LIF kernels against the plain path: spikes bit-identical,
   gradients within 1e-6, every shape and neuron option there; on CUDA its parity tests run on the GPU).
3. ``smoke``: every tiny model family trained 50 steps on one fixed batch on the device, fp32 and bf16 autocast:
   the losses must be finite and the mean of the last 5 below the mean of the first 5.
4. ``train_step``: ``benchmarks/train_step.py`` (``bestformer_4_384``, batch 128, T = 4): plain (one autograd node
   per LIF operation and step, the SpikingJelly-style loop) against fused; images/s, peak memory, ratio.
5. ``time_to_accuracy``: ``bestformer train --recipe cifar10-fast`` with a 4-minute budget on the GPU (the recipe's
   GPU rule: batch 512, lr scaled by the square root of the batch ratio), reading CIFAR-10 from ``.device-data/``.
6. ``torchrun``: ``torchrun --nproc_per_node 1`` (NCCL on CUDA) for one epoch, then a resume to a second epoch.

Writes ``results.json`` (every stage: status, seconds, what it measured, the tail of its output) and
``summary.txt`` into ``--out`` (default ``$OUT``, else ``gpu-check/``). ``--dry-run`` runs every stage on the CPU
with tiny sizes (``cuda_tests`` only collects), proving the plumbing in under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".device-data"
#: the tiny model of every family, for the smoke stage
FAMILIES = ("bestformer_tiny", "spikformer_tiny", "ann_tiny", "a2os2a_tiny", "qsd_tiny", "csd_tiny")


#: the whole check ends within this many seconds (the issue's 9 minutes, less a margin for writing the results)
TOTAL_SECONDS = 530.0
_DEADLINE = [time.perf_counter() + TOTAL_SECONDS]


def run_stage(name: str, cmd: list[str], timeout: float, out: Path, env: dict[str, str] | None = None,
              parse: object = None) -> dict:
    """Run one stage as a subprocess within its own timeout and what is left of the total; never raises.
    ``parse(output) -> dict`` extracts its measurements."""
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    timeout = min(timeout, _DEADLINE[0] - t0)
    if timeout < 5:
        print(f"[{name}] skipped: the check's {TOTAL_SECONDS:.0f} s are spent", flush=True)
        return {"stage": name, "status": "skipped (no time left)", "seconds": 0.0, "command": " ".join(cmd),
                "tail": ""}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)})
        text = proc.stdout + proc.stderr
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as err:
        text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                       for part in (err.stdout, err.stderr))  # the stage's warnings and traceback are on stderr
        status = f"timed out after {timeout:.0f} s"
    except OSError as err:
        text, status = str(err), f"failed to start ({err.strerror})"
    text = re.sub(r"[^\n]*\r", "", text)  # progress-bar redraws
    log.write_text(text)
    result = {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(cmd), "tail": text[-1500:]}
    if parse is not None:
        try:
            result.update(parse(text))  # type: ignore[operator]
        except Exception as err:  # a stage's output we cannot read must not end the check
            result["parse_error"] = f"{type(err).__name__}: {err}"
    print(f"[{name}] {status} in {result['seconds']} s", flush=True)
    return result


def env_info() -> dict:
    info: dict = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}")
    except ImportError as err:
        info["torch"] = f"missing ({err})"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    return info


def smoke(device: str, steps: int) -> None:
    """Stage 3 (run in a child process): every family, fp32 and bf16 autocast, loss finite and falling."""
    import torch

    import bestformer
    from bestformer.training.evaluation import cpu_has_native_bf16

    # without bf16 instructions a CPU emulates it (4-6x slower with AVX2 forced, measured): a dry run checks fp32 there
    native_bf16 = device != "cpu" or cpu_has_native_bf16()
    results = {}
    for name in FAMILIES:
        for dtype in (None, torch.bfloat16) if native_bf16 else (None,):
            torch.manual_seed(0)
            model = bestformer.create_model(name, img_size=16, in_channels=3, num_classes=10).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
            x, y = torch.randn(32, 3, 16, 16, device=device), torch.arange(32, device=device) % 10
            losses = []
            for _ in range(steps):
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                    out = model(x)
                    outs = out if isinstance(out, tuple) else (out,)
                    loss = sum(torch.nn.functional.cross_entropy(o.float(), y) for o in outs) / len(outs)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            k = min(5, max(1, steps // 2))
            finite = all(v == v and abs(v) != float("inf") for v in losses)
            falling = sum(losses[-k:]) / k < sum(losses[:k]) / k
            results[f"{name}/{'bf16' if dtype else 'fp32'}"] = {"first": losses[0], "last": losses[-1],
                                                                "finite": finite, "falling": falling}
    bad = [k for k, v in results.items() if not (v["finite"] and v["falling"])]
    print("SMOKE_JSON " + json.dumps(results))
    if bad:
        raise SystemExit(f"loss not finite or not falling: {', '.join(bad)}")


def _json_line(tag: str):
    def parse(text: str) -> dict:
        for line in text.splitlines():
            if line.startswith(tag + " "):
                return {"measured": json.loads(line[len(tag) + 1:])}
        return {}
    return parse


def _last_lines(n: int):
    def parse(text: str) -> dict:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return {"result_lines": lines[-n:]}
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (plumbing only)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"))
    ap.add_argument("--smoke", default=None, help=argparse.SUPPRESS)  # the child of stage 3: its device
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        smoke(args.smoke, args.steps)
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    # a dry run proves plumbing, not speed: twice the stage timeouts, for a loaded CI machine (within the total),
    # and one thread per stage (a CI machine's other cores are busy with other tests)
    slack = 2.0 if dry else 1.0
    if dry:
        os.environ["OMP_NUM_THREADS"] = "1"
    t_start = time.perf_counter()
    _DEADLINE[0] = t_start + TOTAL_SECONDS
    results = [{"stage": "env", "status": "passed", **env_info()}]
    print(f"[env] {json.dumps(results[0])}", flush=True)
    if not dry and not results[0].get("cuda_available"):
        print("warning: no CUDA device visible; the stages will fail (use --dry-run on a CPU)", flush=True)
    py = [sys.executable]
    kernels = [*py, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    results.append(run_stage("cuda_tests", kernels + (["--co"] if dry else []), 120 * slack, out,
                             parse=_last_lines(2)))
    results.append(run_stage("smoke", [*py, __file__, "--smoke", dev, "--steps", "6" if dry else "50"],
                             60 * slack, out, parse=_json_line("SMOKE_JSON")))
    ts = [*py, "benchmarks/train_step.py", "--device", dev, "--configs", "plain,fused",
          "--out", str(out / "train_step")]
    ts += ["--model", "bestformer_tiny", "--batch", "2", "--steps", "1", "--img-size", "16"] if dry else \
        ["--batch", "128", "--steps", "5"]
    results.append(run_stage("train_step", ts, 90 * slack, out, parse=_last_lines(4)))
    runs = Path("/tmp/bestformer-gpu-check-runs") if not dry else out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cifar = DATA / "cifar10-train-jpeg.tar.gz"
    tta = [*py, "-m", "bestformer", "train", "--out", str(runs), "--name", "tta", "--device", dev]
    if dry:
        tta += ["--recipe", "none", "--model", "bestformer_tiny", "--dataset", "digits", "--time-budget", "40s",
                "--time-step-schedule", "1:0.5,4:0.5", "--batch-size", "64", "--monitor-every", "0"]
    else:
        tta += ["--recipe", "cifar10-fast", "--data-dir", str(cifar), "--time-budget", "4m"]
    results.append(run_stage("time_to_accuracy", tta, (60 if dry else 280) * slack, out, parse=_last_lines(4)))
    launch = [*py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "bestformer",
              "train", "--recipe", "none", "--model", "bestformer_tiny", "--dataset", "digits", "--out", str(runs),
              "--name", "ddp", "--batch-size", "64", "--device", dev, "--limit", "256" if dry else "1797"]
    first = run_stage("torchrun", [*launch, "--epochs", "1"], 60 * slack, out, parse=_last_lines(3))
    results.append(first)
    resumed = [*py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "bestformer",
               "train", "--resume", str(runs / "ddp"), "--epochs", "2", "--out", str(runs)]
    results.append(run_stage("torchrun_resume", resumed, 60 * slack, out, parse=_last_lines(3)))
    total = time.perf_counter() - t_start
    doc = {"dry_run": dry, "seconds": round(total, 1), "stages": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"bestformer GPU check ({'dry run on the CPU' if dry else 'CUDA'}), {total / 60:.1f} min",
             f"env: {results[0].get('gpu', 'no GPU')} | driver {results[0].get('nvidia_smi', '-')} | torch "
             f"{results[0].get('torch')} (CUDA {results[0].get('cuda')}) | triton {results[0].get('triton')}"]
    lines += [f"{r['stage']}: {r['status']} ({r.get('seconds', 0)} s)" for r in results[1:]]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [r["stage"] for r in results if r["status"] != "passed"]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
