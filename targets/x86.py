"""x86: the CPU this process runs on, as LLVM detects it."""

from tvm.target.codegen import llvm_cpu_has_features, llvm_get_system_cpu

from .preset import TargetPreset, x86_target


def _detect() -> TargetPreset:
    target = x86_target(llvm_get_system_cpu())
    import tvm

    tvm_target = tvm.target.Target(target)
    checks = {"AVX2": "avx2", "AVX-512": "avx512f", "VNNI (int8 dot)": "avx512vnni"}
    enables = tuple(k for k, v in checks.items() if llvm_cpu_has_features([v], tvm_target))
    return TargetPreset("x86", target, f"this host's CPU ({target['mcpu']})", enables)


PRESET = _detect()
