"""Schedules: the default kernel schedules per target, used where no tuning record matches.

``default_schedule_passes(target)`` is the one table each target kind contributes through:
a list of passes that the build pipeline runs after FuseTIR.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl

from .cpu_injective import InjectiveParallel
from .cpu_tiling import MultiplyAccumulateTiling
from .cpu_winograd import WinogradConv


def _cpu_rules():
    # First rule that accepts a kernel wins: Winograd convolutions, tiled multiply-accumulate
    # kernels, then TVM's own CPU rules for matrix-vector and row reductions (softmax,
    # norms), then a parallel vectorized loop nest for everything else.
    return [
        WinogradConv(),
        MultiplyAccumulateTiling(),
        dl.cpu.GEMV(),
        dl.cpu.Reduction(),
        InjectiveParallel(),
    ]


_RULES = {"llvm": _cpu_rules}


def default_schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The passes that give every unscheduled kernel a default schedule for ``target``."""
    rules = _RULES.get(target.kind.name)
    return [dl.ApplyDefaultSchedule(*rules())] if rules else []
