"""Fallback CPU schedule: every loop nest parallel over its outer loops and vectorized inside.

Covers elementwise kernels, pooling (a max/avg reduction per output), softmax (each of its
reductions and elementwise steps a loop nest of its own), padding, layout transforms and
anything no other rule took.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_common import (
    iter_kinds,
    loop_extent,
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
                schedule_window_reduction(sch, block, spatial, lanes)
        return sch


def schedule_window_reduction(sch: s_tir.Schedule, block, spatial: int, lanes: int) -> None:
    """A reduction per output (pooling, softmax's max and sum): parallel over the leading
    spatial loops; where the last spatial loop fills vectors, it moves inside the reduction
    loops and is vectorized, so each step reduces a vector of outputs."""
    loops = sch.get_loops(block)
    leading, last, reduction = loops[: spatial - 1], loops[spatial - 1], loops[spatial:]
    extent = loop_extent(sch, last)
    if extent is None or extent < lanes or extent % lanes:
        sch.parallel(sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0])
        return
    last_outer, vector = sch.split(last, factors=[None, lanes])
    sch.reorder(last_outer, *reduction, vector)
    outer = [*leading, last_outer]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(vector)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
