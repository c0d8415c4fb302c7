"""What this machine's CPU is and can do, read once from Linux ``/proc/cpuinfo``: every timing the library prints
names the CPU and its vector extensions beside it, and a few code paths (bf16 autocast, the popcount kernels) depend
on them. Elsewhere (macOS, Windows) the flags are empty and the name comes from :mod:`platform`."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

#: vector extensions worth naming beside a CPU timing (x86 and ARM)
TIMING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_vpopcntdq", "amx_bf16", "amx_tile",
                "asimd", "sve")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as ``/proc/cpuinfo`` describes its first logical processor."""

    model: str  #: "model name" (x86) or the platform's processor name
    family: str  #: "cpu family" and "model" on x86 ("family 25 model 17"); empty elsewhere
    cpus: int  #: logical CPUs
    flags: frozenset[str]  #: "flags" (x86) or "Features" (ARM)

    @property
    def timing_flags(self) -> list[str]:
        """The extensions of :data:`TIMING_FLAGS` this CPU has, in that order."""
        return [f for f in TIMING_FLAGS if f in self.flags]

    def describe(self) -> str:
        """One line for a log or a report: ``AMD EPYC (family 25 model 17), 2 cores, avx2 fma avx512f``."""
        family = f" ({self.family})" if self.family else ""
        return f"{self.model}{family}, {self.cpus} cores, {' '.join(self.timing_flags) or 'no vector extensions'}"

    def as_dict(self) -> dict[str, object]:
        """For a result file (JSON)."""
        return {"model": self.model, "family": self.family, "cpus": self.cpus, "flags": self.timing_flags}


def parse_cpuinfo(text: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo``; only its first processor block is read (all are alike
    on the machines we time on)."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    family = f"family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(model=model, family=family, cpus=os.cpu_count() or 1, flags=flags)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while the process runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)
