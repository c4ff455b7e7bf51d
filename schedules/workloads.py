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


def skeleton_of(workload: tvm.IRModule) -> str:
    """A workload's loop-and-block structure without the values it computes with.

    Two kernels with the same skeleton have the same parameters (shapes, dtypes), blocks
    (names, iteration domains, kinds) and loops, and differ at most in the constants of
    their arithmetic: an INT8 layer's zero points and clamp bounds, which calibration
    chooses, are immediates in the kernel. A schedule is a sequence of loop and block
    transformations, so one tuned for either applies to the other; records found this way
    are still checked on random inputs like any other (schedules/apply_records.py).
    """
    from tvm.s_tir import Schedule

    func = workload["main"]
    sch = Schedule(workload)
    parts = [[(tuple(int(d) for d in p.shape), str(p.dtype))
              for p in func.params if getattr(p, "shape", None) is not None]]

    def walk(parent) -> None:
        for child in sch.get_child_blocks(parent):
            block = sch.get(child)
            parts.append((
                block.name_hint,
                tuple((int(v.dom.extent), int(v.iter_type)) for v in block.iter_vars),
                tuple(int(sch.get(loop).extent) for loop in sch.get_loops(child)),
                tuple((tuple(b.shape), str(b.dtype)) for b in block.alloc_buffers),
            ))
            walk(child)

    walk(sch.get_sblock("root"))
    return str(parts)


def kernels(mod: tvm.IRModule) -> list[Kernel]:
    """The distinct kernels worth tuning, largest first.

    Kernels already scheduled are left out, and so are pure reshapes: the build turns them
    into views (RewriteDataflowReshape), so no schedule of theirs ever runs. Kernels with
    one :func:`skeleton_of` are tuned once (the first found), since its records serve all.
    """
    found: dict[str, Kernel] = {}
    skeletons = set()
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs and func.attrs.get("tirx.is_scheduled", False):
            continue
        if relax.analysis.has_reshape_pattern(func):
            continue
        workload = workload_of(func)
        key = str(tvm_ffi.structural_hash(workload))
        skeleton = skeleton_of(workload)
        if key not in found and skeleton not in skeletons:
            skeletons.add(skeleton)
            found[key] = Kernel(gv.name_hint, workload, key, _flops(workload))
    return sorted(found.values(), key=lambda k: (-k.flops, k.name))


def _flops(workload: tvm.IRModule) -> float:
    try:
        return float(estimate_tir_flops(workload))
    except Exception:
        return 0.0
