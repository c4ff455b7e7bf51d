"""Schedules: the default kernel schedules per target, used where no tuning record matches.

``default_schedule_passes(target)`` is the one table each target kind contributes through:
a list of passes that the build pipeline runs after FuseTIR.
"""

from __future__ import annotations

import logging

import tvm
from tvm.s_tir import dlight as dl
from tvm.s_tir.schedule.schedule import ScheduleError

from .cpu_conv import BlockedConv, DepthwiseConv, PointwiseConv, PointwiseQuadConv
from .cpu_injective import InjectiveParallel
from .cpu_matmul import BlockedMatmul
from .cpu_pool import WindowPool
from .cpu_tiling import MultiplyAccumulateTiling
from .cpu_winograd import WinogradConv
from .cuda import TensorCoreMatmul
from .cuda_int4 import Int4TensorCoreMatmul

_log = logging.getLogger("tvmq.schedules")


def _cpu_rules():
    # First rule that accepts a kernel wins: Winograd convolutions; blocked direct,
    # depthwise and pointwise convolutions and matmuls; tiled multiply-accumulate
    # kernels; TVM's own CPU rule for matrix-vector products; then a parallel vectorized
    # loop nest for everything else (row reductions included: dlight's cpu.Reduction
    # recomputed a [1, 1000] softmax's max and sum once per output element, 2.6 ms
    # instead of microseconds).
    return [
        WinogradConv(),
        BlockedConv(),
        DepthwiseConv(),
        PointwiseConv(),
        PointwiseQuadConv(),
        BlockedMatmul(),
        WindowPool(),
        MultiplyAccumulateTiling(),
        dl.cpu.GEMV(),
        InjectiveParallel(),
    ]


def _cuda_rules():
    # Tensor cores first (fp16 / int8 WMMA, int4 through the s4 8x8x32 WMMA), then TVM's
    # own GPU rules, which the CUDA backend would otherwise apply alone.
    return [
        TensorCoreMatmul(),
        Int4TensorCoreMatmul(),
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


_RULES = {"llvm": _cpu_rules, "cuda": _cuda_rules}


class _Yielding(dl.ScheduleRule):
    """A rule that hands a kernel it cannot schedule to the next rule instead of failing
    the build: each rule covers the shapes it was written for, the last one covers all."""

    def __init__(self, rule: dl.ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except (ScheduleError, tvm.error.InternalError) as err:
            _log.debug("%s cannot schedule a kernel: %s", type(self.rule).__name__, err)
            return None

    def is_target_available(self, target) -> bool:
        return self.rule.is_target_available(target)


def default_schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The passes that give every unscheduled kernel a default schedule for ``target``."""
    rules = _RULES.get(target.kind.name)
    return [dl.ApplyDefaultSchedule(*(_Yielding(r) for r in rules()))] if rules else []


def default_rules(target: tvm.target.Target) -> list:
    """The rules behind ``default_schedule_passes``, in order (the first that applies wins)."""
    rules = _RULES.get(target.kind.name)
    return rules() if rules else []


def default_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target):
    """The schedule the build gives ``func`` by default (a ``Schedule``), or None."""
    for rule in default_rules(target):
        space = _Yielding(rule).apply(func, target, False)
        if space:
            return space[0] if isinstance(space, list) else space
    return None
