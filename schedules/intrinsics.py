"""Register the tensor intrinsics a target's schedules may name, and no others.

meta_schedule imports ``tvm.s_tir.tensor_intrin`` whole (in ``TuneContext`` and in every
``LocalBuilder`` worker): it builds the CUDA, ROCm, Hexagon, ARM and x86 intrinsics from
TVMScript, which takes 20-90 s on a busy 2-core machine, and the builder pays it again for
every batch because its process pool restarts. A CPU target only needs its own family.
Importing that module alone, under a package entry that stands in for the full one, keeps
tuning and applying records fast; a process that needs everything (a CUDA target) imports
the whole package first and this becomes a no-op.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import tvm

_PACKAGE = "tvm.s_tir.tensor_intrin"
# What ``import tvm.s_tir.tensor_intrin`` itself loads (with LLVM enabled).
_ALL_FAMILIES = ("cuda", "arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu")


def register_tensor_intrinsics(target: tvm.target.Target) -> None:
    """Make the tensor intrinsics that schedules for ``target`` may use resolvable by name."""
    if target.kind.name == "llvm":
        triple = str(target.attrs.get("mtriple", ""))
        families = ("arm_cpu",) if triple.startswith(("aarch64", "arm")) else ("x86",)
    else:
        families = _ALL_FAMILIES
    if _PACKAGE not in sys.modules:
        import tvm.s_tir

        partial = types.ModuleType(_PACKAGE)
        partial.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        sys.modules[_PACKAGE] = partial
    for family in families:
        importlib.import_module(f"{_PACKAGE}.{family}")
    # tvmq's own, which its int8 schedules (and so their tuning records) name.
    from . import cuda_int4, int8_dot

    int8_dot.register_all()
    if target.kind.name == "cuda":
        cuda_int4.register_packed_loads()
