"""``make cross-check`` (benchmarks/cross_check.py) where the cross tools are installed: the zoo's MNIST model
built for a Cortex-M4 within the flash and RAM goals, and for aarch64, run under qemu bit-exact against the packed
runtime. Skipped, with the reason, where the tools are missing: ``make cross-check`` installs them (apt-get), ``make
test`` does not, so a CI machine that runs only ``make test`` skips it; test_c_export.py covers the same C code with
the host's compiler there."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cross_check  # noqa: E402


@pytest.mark.data
@pytest.mark.skipif(any(shutil.which(t) is None for t in cross_check.TOOLS),
                    reason=f"cross tools missing ({', '.join(cross_check.TOOLS)}): make cross-check")
def test_cross_check_on_mnist(shared_data, tmp_path, capsys):
    out = tmp_path / "cc.json"
    assert cross_check.main(["--data-dir", str(shared_data / "mnist"), "--limit", "24", "--results", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("cross-check passed")
    res = json.loads(out.read_text())
    fw = res["cortex_m4"]["firmware"]
    # the firmware's RAM is the static arena and input (the model allocates nothing else), its flash the weights
    # and the kernels
    assert res["arena_bytes"] <= fw["bss"] and fw["flash"] > res["weight_bytes"]
    assert fw["flash"] <= 64 * 1024 and fw["ram"] <= 192 * 1024
    assert set(res["aarch64_qemu"]) == {"neon", "portable"}
    assert all(r["bit_equal_packed"] and r["argmax_equal_pytorch"] for r in res["aarch64_qemu"].values())


def test_cross_check_names_missing_tools(monkeypatch, capsys):
    monkeypatch.setattr(cross_check.shutil, "which", lambda tool: None)
    assert cross_check.main(["--limit", "1"]) == 2
    assert "missing cross tools" in capsys.readouterr().err
