"""The GPU readiness script's dry run: every stage on the CPU at tiny sizes, so CI proves the plumbing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from bestformer.training.evaluation import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]


def _gpu_check() -> object:
    """benchmarks/gpu_check.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_passes_every_stage_at_tiny_sizes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=_gpu_check().TOTAL_SECONDS + 30)  # past the script's own limit: its report comes back
    doc = json.loads((tmp_path / "results.json").read_text())
    stages = {s["stage"]: s for s in doc["stages"]}
    assert list(stages) == ["env", "cuda_tests", "smoke", "train_step", "time_to_accuracy", "torchrun",
                            "torchrun_resume"]
    failed = {k: s["tail"] for k, s in stages.items() if s["status"] != "passed"}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-2000:])
    smoke = stages["smoke"]["measured"]
    # without native bf16 the smoke stage checks fp32 only (bf16 autocast is emulated)
    assert len(smoke) == (12 if cpu_has_native_bf16() else 6)
    assert all(v["finite"] and v["falling"] for v in smoke.values())
    assert "tests collected" in " ".join(stages["cuda_tests"]["result_lines"])
    summary = (tmp_path / "summary.txt").read_text()
    assert "dry run" in summary and "7 passed, 0 failed" in proc.stdout
    # every stage ran at its tiny size (a wall-clock bound would also fail a loaded CI machine)
    sizes = {"smoke": "--steps 6", "train_step": "--img-size 16", "time_to_accuracy": "--dataset digits",
             "torchrun": "--limit 256"}
    assert all(arg in stages[name]["command"] for name, arg in sizes.items()), {k: stages[k]["command"] for k in sizes}
    assert stages["cuda_tests"]["command"].endswith("--co")


def test_a_timed_out_stage_keeps_its_stderr(tmp_path: Path) -> None:
    gpu_check = _gpu_check()
    gpu_check._DEADLINE[0] = time.perf_counter() + 60
    code = "import sys, time; print('out', flush=True); print('budget warning', file=sys.stderr, flush=True); " \
           "time.sleep(30)"
    result = gpu_check.run_stage("slow", [sys.executable, "-c", code], 5, tmp_path)
    assert result["status"].startswith("timed out")
    assert "out" in result["tail"] and "budget warning" in result["tail"]
    assert "budget warning" in (tmp_path / "slow.log").read_text()
