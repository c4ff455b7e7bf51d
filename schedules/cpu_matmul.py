"""Default CPU schedule for the blocked-weight matmul (passes/matmul_blocked.py).

The same register tile as the blocked convolution (schedules/cpu_conv.py): a few rows of
the activation by ``vo`` vectors of output columns, each reduction step loading ``vo``
weight vectors and broadcasting one activation per row. Tiles run in parallel with the
column block outermost, so a block's weights (K x B) stay in cache across all rows.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from . import int8_dot
from .cpu_common import (
    accumulate_locally,
    find_kernel,
    float32_lanes,
    loop_extent,
    num_vector_registers,
    schedule_prologue,
    schedule_tile_epilogue,
)
from .cpu_conv import choose_tile
from .kernel_layouts import MATMUL_BLOCKED


class BlockedMatmul(CPUScheduleRule):
    """Kernels whose main block is ``matmul_blocked``, with prologue and epilogue blocks."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = find_kernel(func, MATMUL_BLOCKED) if self.is_target_available(target) else None
        if found is None:
            return None
        sch, blocks, index = found
        main = blocks[index]
        # Weight [N/B, K, B], or [N/B, K/g, B, g] in a grouped form.
        group, lanes, block, intrinsic = int8_dot.weight_form(
            sch, main, 4, 2, float32_lanes(target))
        spatial = sch.get_loops(main)[: -2 if group > 1 else -1]
        extents = [loop_extent(sch, loop) for loop in spatial]
        if any(e is None for e in extents) or block % lanes:
            return None
        registers = num_vector_registers(target)
        _, rows, vo = choose_tile(1, extents[-2], block // lanes, registers)
        if group == 1:
            # A predicate inside the tensorized block defeats tensorize: grouped forms keep
            # tiles that divide the rows.
            rows = _rows_past_divisors(extents[-2], rows, vo, registers)

        prologue, epilogue = accumulate_locally(sch, blocks, index)
        loops = sch.get_loops(main)
        lane = loops.pop() if group > 1 else None
        *batch, m, n, k = loops
        n_outer, n_inner = sch.split(n, factors=[None, vo * lanes])
        m_outer, m_inner = sch.split(m, factors=[None, rows])
        vectors, vector = sch.split(n_inner, factors=[vo, lanes])
        sch.reorder(n_outer, *batch, m_outer, k, m_inner, vectors, vector,
                    *([lane] if lane else []))
        tile = sch.fuse(n_outer, *batch, m_outer)
        sch.parallel(tile)
        sch.unroll(m_inner)
        sch.unroll(vectors)
        int8_dot.finish_tile(sch, main, k, vector, tile, epilogue, intrinsic)
        schedule_tile_epilogue(sch, epilogue, lanes)
        for earlier in prologue:
            schedule_prologue(sch, earlier, lanes)
        return sch


def _rows_past_divisors(extent: int, rows: int, vo: int, registers: int) -> int:
    """More rows per tile than any divisor of ``extent`` gives, the last tile predicated.

    Sequence lengths such as 197 (ViT) or 77 (CLIP) have no small divisor, which leaves a
    1-row tile of two accumulators. A predicated tile of two thirds of the registers keeps
    its speed (197x768x768, AVX2: 4 rows 128 GFLOP/s against 44 for 1 row; a predicated
    6-row tile ran at 65: predicates and a full register file spill). Only where the
    divisors leave less than half that tile: a predicate costs more than a row or two.
    """
    wanted = (registers - 4) * 2 // 3 // vo
    return wanted if 2 * rows < wanted < extent else rows

