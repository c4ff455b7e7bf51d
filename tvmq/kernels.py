"""What each compiled kernel is: the ONNX nodes it covers, its work, precision and algorithm.

Computed once at build time from the final module and stored in the artifact's manifest
(``kernels``), so the profiler needs nothing but the artifact.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx

from .schedules.apply_records import SCHEDULE_ATTR
from .schedules.kernel_layouts import CONV_POINTWISE as POINTWISE_NAME

KERNEL_ORIGINS_ATTR = "tvmq.kernel_origins"
ALGORITHM_ATTR = "tvmq.algorithm"
KERNEL_OPS_ATTR = "tvmq.kernel_ops"


@tvm.transform.module_pass(opt_level=0, name="RecordKernelOps")
class RecordKernelOps:
    """Store each kernel's operation count (``tvmq.kernel_ops``) before it is scheduled;
    changes no function. TVM's estimate cannot read tensorized kernels (the int8 ones), so
    the manifest's ``ops`` (and the profiler's GOP/s) come from here."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        ops = {gv.name_hint: _ops(f) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc)}
        return mod.with_attr(KERNEL_OPS_ATTR, {k: v for k, v in ops.items() if v})


def kernel_table(mod: tvm.IRModule) -> dict[str, dict[str, Any]]:
    """Per PrimFunc: nodes, flops (or integer ops), bytes of its tensors, precision, algorithm."""
    attrs = mod.attrs or {}
    origins = attrs[KERNEL_ORIGINS_ATTR] if KERNEL_ORIGINS_ATTR in attrs else {}
    recorded = attrs[KERNEL_OPS_ATTR] if KERNEL_OPS_ATTR in attrs else {}
    table = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        table[name] = {
            "nodes": [str(n) for n in origins.get(name, [])],
            "ops": int(recorded[name]) if name in recorded else _ops(func),
            "bytes": _bytes(func),
            "precision": _precision(name, func),
            "algorithm": _algorithm(name, func),
            # tuned (--tuning-records), shipped (schedules/tuned/) or default.
            "schedule": str((func.attrs or {}).get(SCHEDULE_ATTR, "default")),
        }
    return table


def _ops(func: tirx.PrimFunc) -> int:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return int(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # an estimate the analysis cannot make is reported as unknown (0)
        return 0


def _bytes(func: tirx.PrimFunc) -> int:
    total = 0
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        dims = [int(d) if isinstance(d, tirx.IntImm) else 0 for d in shape]
        total += math.prod(dims) * max(param.dtype.bits, 8) // 8
    return total


def _precision(name: str, func: tirx.PrimFunc) -> str:
    dtypes = {str(p.dtype) for p in func.params if getattr(p, "shape", None) is not None}
    if "int4" in name:  # realize names its packed-weight kernels conv2d_int4 / matmul_int4
        return "int4"
    if dtypes & {"int8", "uint8"}:
        return "int8"
    if "float16" in dtypes:
        return "fp16"
    return "fp32"


def _algorithm(name: str, func: tirx.PrimFunc) -> str:
    attrs = func.attrs or {}
    if ALGORITHM_ATTR in attrs:
        return str(attrs[ALGORITHM_ATTR])
    if "winograd" in name:
        return "winograd"
    # The pointwise kernel is ConvToGemm's 1x1 form (passes/conv_to_gemm.py).
    if "conv2d_gemm" in name or "im2col" in name or POINTWISE_NAME in name:
        return "gemm"
    if "conv2d" in name:
        return "direct"
    if "matmul" in name or "dense" in name:
        return "gemm"
    return "-"
