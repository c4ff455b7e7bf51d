"""The kernels of a fused module as tuning workloads, keyed the way records name them.

A workload is one kernel alone in a module, normalized as meta_schedule normalizes it
(global symbol ``main``, no aliasing). tvmq's own bookkeeping attributes (``tvmq.*``, such as
the ONNX node a kernel came from) are dropped first, so a record tuned on one model applies
to the same kernel in any other. Tuning and applying records both go through
:func:`workload_of`, so the two always agree on the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir.analysis import estimate_tir_flops

_normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")


@dataclass(frozen=True)
class Kernel:
    """A distinct kernel of the module: its first name, workload, key and FLOP estimate."""

    name: str
    workload: tvm.IRModule
    key: str
    flops: float


def workload_of(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The workload module a kernel is tuned and looked up as."""
    for key in list(func.attrs.keys()) if func.attrs else []:
        if str(key).startswith("tvmq."):
            func = func.without_attr(str(key))
    return _normalize(func)


def kernels(mod: tvm.IRModule) -> list[Kernel]:
    """The distinct kernels worth tuning, largest first.

    Kernels already scheduled are left out, and so are pure reshapes: the build turns them
    into views (RewriteDataflowReshape), so no schedule of theirs ever runs.
    """
    found: dict[str, Kernel] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs and func.attrs.get("tirx.is_scheduled", False):
            continue
        if relax.analysis.has_reshape_pattern(func):
            continue
        workload = workload_of(func)
        key = str(tvm_ffi.structural_hash(workload))
        if key not in found:
            found[key] = Kernel(gv.name_hint, workload, key, _flops(workload))
    return sorted(found.values(), key=lambda k: (-k.flops, k.name))


def _flops(workload: tvm.IRModule) -> float:
    try:
        return float(estimate_tir_flops(workload))
    except Exception:
        return 0.0
