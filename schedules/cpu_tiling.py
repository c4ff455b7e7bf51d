"""Default CPU schedule for multiply-accumulate kernels: conv2d, matmul, dense, batch matmul.

Register tiling: the innermost output axis (contiguous in memory) is vectorized, a second
output axis is blocked so that a tile of accumulators stays in vector registers across the
whole reduction, the tiles run in parallel over all cores, and the elementwise epilogue
fused after the kernel (bias, activation, residual add, requantize) runs on each tile
while it is still in cache.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_common import (
    inline_epilogue_inputs,
    iter_kinds,
    loop_extent,
    num_vector_registers,
    out_dtype_bits,
    schedule_injective,
    schedule_tile_epilogue,
    top_level_blocks,
    vector_bits,
)


class MultiplyAccumulateTiling(CPUScheduleRule):
    """conv2d / matmul / dense with optional injective prologue and epilogue blocks."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = top_level_blocks(sch)
        kinds = [iter_kinds(sch, b) for b in blocks]
        reductions = [i for i, k in enumerate(kinds) if "R" in k]
        if len(reductions) != 1 or any("O" in k for k in kinds):
            return None
        index = reductions[0]
        main = blocks[index]
        if not _is_multiply_accumulate(sch, main) or not _spatial_then_reduce(kinds[index]):
            return None
        lanes = vector_bits(target) // max(out_dtype_bits(sch, main), 8)
        prologue = inline_epilogue_inputs(sch, blocks[:index], main)
        if not tile_accumulation(sch, main, blocks[index + 1 :], target):
            return None
        for block in prologue:
            schedule_injective(sch, block, lanes)
        return sch


def tile_accumulation(sch: s_tir.Schedule, main, epilogue: list, target: Target) -> bool:
    """Register-tile the multiply-accumulate block ``main`` and run ``epilogue`` per tile.

    The accumulators live in a local tile that LLVM keeps in vector registers; the copy out
    of it and every elementwise block after the kernel fold into the last block, which runs
    per tile while the tile is still in cache.
    """
    lanes = vector_bits(target) // max(out_dtype_bits(sch, main), 8)
    epilogue = [sch.cache_write(main, 0, "local"), *epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    tiled = _tile(sch, main, lanes, num_vector_registers(target))
    if tiled is None:
        return False
    tile_loop, vectorized = tiled
    sch.reverse_compute_at(epilogue[-1], tile_loop)
    if vectorized:
        schedule_tile_epilogue(sch, epilogue[-1], lanes)
    return True


def _is_multiply_accumulate(sch: s_tir.Schedule, block) -> bool:
    body = sch.get(block).body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    products = [body.value.a, body.value.b]
    return any(_strip_casts(p).__class__ is tirx.Mul for p in products)


def _strip_casts(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _spatial_then_reduce(kinds: str) -> bool:
    spatial = kinds.rstrip("R")
    return bool(spatial) and "R" not in spatial and len(spatial) < len(kinds)


def divisor_at_most(extent: int, limit: int) -> int:
    """The largest divisor of ``extent`` up to ``limit``."""
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def accumulator_rows(extent: int, vectors_per_row: int, registers: int) -> int:
    """Rows of the accumulator tile along an output axis of ``extent``: the most that
    divide it and fit the vector registers with ``vectors_per_row`` vectors a row (four
    registers left for the operands)."""
    return divisor_at_most(extent, max(1, (registers - 4) // vectors_per_row))


def _tile(sch: s_tir.Schedule, block, lanes: int, registers: int):
    loops = sch.get_loops(block)
    kinds = iter_kinds(sch, block)
    spatial = list(loops[: len(kinds.rstrip("R"))])
    reduction = list(loops[len(spatial) :])
    extents = [loop_extent(sch, loop) for loop in spatial]
    if any(e is None for e in extents):
        return None

    # Vector axis: the innermost output axis, split so the vector width divides it.
    vec_extent = extents[-1]
    if vec_extent % lanes == 0:
        vec_factor = lanes
    elif vec_extent <= 2 * lanes:
        vec_factor = vec_extent
    else:
        vec_factor = divisor_at_most(vec_extent, lanes)
    vectors_per_row = -(-vec_factor // lanes)

    # Block axis: the largest other output axis; its tile rows are the accumulators.
    others = list(range(len(spatial) - 1))
    block_axis = max(others, key=lambda i: extents[i], default=None)
    block_factor = (accumulator_rows(extents[block_axis], vectors_per_row, registers)
                    if block_axis is not None else 1)

    outer, inner = [], []
    for i, loop in enumerate(spatial):
        if i == len(spatial) - 1:
            vec_outer, vec_inner = sch.split(loop, factors=[None, vec_factor])
            outer.append(vec_outer)
            inner.append(vec_inner)
        elif i == block_axis and block_factor > 1:
            block_outer, block_inner = sch.split(loop, factors=[None, block_factor])
            outer.append(block_outer)
            inner.insert(0, block_inner)
        else:
            outer.append(loop)
    sch.reorder(*outer, *reduction, *inner)
    tile_loop = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(tile_loop)
    if len(inner) == 2:
        sch.unroll(inner[0])
    if vec_factor > 1:
        sch.vectorize(inner[-1])
    # The accumulator tile is zeroed once per tile, outside the reduction loops.
    sch.decompose_reduction(block, reduction[0])
    return tile_loop, vec_factor > 1
