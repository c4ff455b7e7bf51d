"""Fallback CPU schedule: every loop nest parallel over its outer loops and vectorized inside.

Covers elementwise kernels, pooling (a max/avg reduction per output), padding, layout
transforms and anything no other rule took.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_common import (
    iter_kinds,
    out_dtype_bits,
    schedule_injective,
    top_level_blocks,
    vector_bits,
)


class InjectiveParallel(CPUScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = top_level_blocks(sch)
        if not blocks:
            return None
        for block in blocks:
            kinds = iter_kinds(sch, block)
            loops = sch.get_loops(block)
            if len(loops) != len(kinds) or "O" in kinds:
                continue
            spatial = len(kinds) - len(kinds.lstrip("S"))
            if spatial == 0:
                continue
            lanes = vector_bits(target) // max(out_dtype_bits(sch, block), 8)
            if spatial == len(kinds):
                schedule_injective(sch, block, lanes)
            else:
                # A reduction per output (pooling): parallel over the leading spatial loops.
                leading = loops[:spatial]
                sch.parallel(sch.fuse(*leading) if len(leading) > 1 else leading[0])
        return sch
