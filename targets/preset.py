"""What a target preset is, and what running an artifact built for it requires.

A preset names a TVM target in dict form and says what it enables. What the artifact
needs from the machine that loads it (the CPU architecture, the CPU features the code
may use, a GPU) is derived from the TVM target itself through LLVM, so a raw target
dict is checked the same way as a preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import tvm

# LLVM feature name -> the flag Linux reports in /proc/cpuinfo when the CPU has it.
_X86_FEATURES = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
}
_AARCH64_FEATURES = {
    "neon": "asimd",
    "dotprod": "asimddp",
    "i8mm": "i8mm",
    "sve": "sve",
}


@dataclass(frozen=True)
class TargetPreset:
    """A named TVM target and what it enables."""

    name: str
    target: dict[str, Any]
    description: str
    enables: tuple[str, ...] = field(default_factory=tuple)

    @staticmethod
    def of(target: tvm.target.Target) -> TargetPreset:
        """A nameless preset for a TVM target (its architecture and CPU features)."""
        return TargetPreset("custom", copy.deepcopy(dict(target.export())), "")

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(copy.deepcopy(self.target))

    @property
    def device(self) -> str:
        """``cpu`` or the GPU API the artifact runs on (``cuda``)."""
        return "cpu" if self.target["kind"] == "llvm" else self.target["kind"]

    @property
    def host(self) -> dict[str, Any]:
        """The LLVM target of the code that runs on the CPU."""
        return self.target if self.device == "cpu" else self.target.get("host", {"kind": "llvm"})

    @property
    def arch(self) -> str:
        """The CPU architecture the artifact's host code is for (``x86_64``, ``aarch64``)."""
        triple = self.host.get("mtriple") or "x86_64-linux-gnu"
        return triple.split("-")[0]

    def required_cpu_features(self) -> tuple[str, ...]:
        """The /proc/cpuinfo flags a CPU needs to run code built for this target."""
        table = _AARCH64_FEATURES if self.arch == "aarch64" else _X86_FEATURES
        host = tvm.target.Target(copy.deepcopy(self.host))
        from tvm.target.codegen import llvm_cpu_has_features

        return tuple(
            flag for feature, flag in table.items() if llvm_cpu_has_features([feature], host)
        )

    def runs_here(self) -> bool:
        """Whether code built for this target runs on this machine's CPU."""
        import platform

        return (
            self.device == "cpu"
            and self.arch == platform.machine()
            and set(self.required_cpu_features()) <= host_cpu_features()
        )

    def describe(self) -> str:
        enabled = ", ".join(self.enables) if self.enables else "-"
        return f"{self.name:<16} {self.description}  [{enabled}]"


def x86_target(mcpu: str) -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}


def aarch64_target(*mattr: str) -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", *mattr]}


def cuda_target(arch: str) -> dict[str, Any]:
    return {"kind": "cuda", "arch": arch, "host": x86_target("x86-64-v3")}


def host_cpu_features() -> set[str]:
    """The CPU feature flags Linux reports for this machine."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()
