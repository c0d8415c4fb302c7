"""The CPU description every timing is printed beside (``bestformer.hardware``), and the code paths that read it."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from bestformer.hardware import cpu_info, parse_cpuinfo
from bestformer.training import evaluation

X86 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9B14
flags		: fpu sse2 avx2 fma avx512f avx512_vpopcntdq avx512_bf16 popcnt

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 99
model		: 1
model name	: another name the parser must not take
flags		: fpu amx_bf16
"""

ARM = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve
CPU implementer	: 0x41
CPU part	: 0xd40

processor	: 1
Features	: fp asimd
"""


def test_x86_first_processor_block_only():
    info = parse_cpuinfo(X86)
    assert info.model == "AMD EPYC 9B14" and info.family == "family 25 model 17"
    assert "amx_bf16" not in info.flags and {"avx2", "popcnt", "avx512_bf16"} <= info.flags
    # in TIMING_FLAGS' order, not the file's, and only the ones that matter for timings
    assert info.timing_flags == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vpopcntdq"]
    assert info.describe() == f"AMD EPYC 9B14 (family 25 model 17), {info.cpus} cores, " \
                              "avx2 fma avx512f avx512_bf16 avx512_vpopcntdq"
    assert info.as_dict() == {"model": "AMD EPYC 9B14", "family": "family 25 model 17", "cpus": info.cpus,
                              "flags": info.timing_flags}


def test_arm_features_and_no_model_name():
    info = parse_cpuinfo(ARM)
    assert info.family == "" and info.model == (platform.processor() or platform.machine())
    assert info.timing_flags == ["asimd", "sve"] and "fp" in info.flags


def test_no_cpuinfo_is_no_flags():
    info = parse_cpuinfo("")
    assert info.flags == frozenset() and info.describe().endswith("no vector extensions")


def test_this_machine_matches_proc_cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this platform")
    line = next(ln for ln in text.splitlines() if ln.startswith(("flags", "Features")))
    assert cpu_info().flags == frozenset(line.split(":", 1)[1].split())


@pytest.mark.parametrize(("text", "native"), [(X86, True), (X86.replace(" avx512_bf16", ""), False),
                                              ("flags : avx2 amx_bf16 amx_tile\n", True), (ARM, False)])
def test_amp_fast_is_bf16_only_on_native_bf16_cpus(monkeypatch, text, native):
    monkeypatch.setattr(evaluation, "cpu_info", lambda: parse_cpuinfo(text))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert evaluation.amp_dtype("fast", cpu) == (torch.bfloat16 if native else None)
    assert evaluation.amp_dtype("fast", cuda) == torch.bfloat16  # every CUDA GPU we target has bf16
    assert evaluation.amp_dtype("auto", cpu) is None
