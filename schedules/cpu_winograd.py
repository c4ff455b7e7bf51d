"""Default CPU schedule for tvmq's Winograd convolution kernel (passes/winograd.py).

Stages: gather input tiles, transform them (data_pack), a batched matrix multiply with the
pre-transformed weight (bgemm: nearly all the arithmetic), the inverse transform, and the
gather into NCHW with the fused epilogue. Every stage is vectorized across tiles (the tile
count is padded to a multiple of the vector width); the transforms unroll their small
(eps, nu) loops so their constant coefficients fold; bgemm gets the register tiling of
every multiply-accumulate kernel.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_common import out_dtype_bits, schedule_injective, top_level_blocks, vector_bits
from .cpu_tiling import tile_accumulation

_STAGES = ("input_tile", "data_pack", "bgemm", "inverse", "conv2d_winograd")


class WinogradConv(CPUScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = {sch.get(b).name_hint: b for b in top_level_blocks(sch)}
        if not all(stage in blocks for stage in _STAGES):
            return None
        names = list(blocks)
        epilogue = [blocks[n] for n in names[names.index("conv2d_winograd") + 1 :]]
        lanes = vector_bits(target) // max(out_dtype_bits(sch, blocks["bgemm"]), 8)

        if "data_pad" in blocks:
            sch.compute_inline(blocks["data_pad"])
        schedule_injective(sch, blocks["input_tile"], lanes)
        for name, transformed in (("data_pack", 2), ("inverse", 1)):
            _transform(sch, blocks[name], lanes, unrolled=transformed)
        if not tile_accumulation(sch, blocks["bgemm"], [], target):
            return None
        tail = [blocks["conv2d_winograd"], *epilogue]
        for block in tail[:-1]:
            sch.compute_inline(block)
        schedule_injective(sch, tail[-1], lanes)
        return sch


def _transform(sch: s_tir.Schedule, block, lanes: int, unrolled: int) -> None:
    """Loops (i, j, channel, tile) or (channel, i, j, tile): the (i, j) pair unrolled inside,
    channel and groups of tiles in parallel outside, a vector of tiles innermost."""
    loops = sch.get_loops(block)
    tile_outer, tile_inner = sch.split(loops[-1], factors=[None, lanes])
    if unrolled == 2:
        i, j, channel = loops[:3]
    else:
        channel, i, j = loops[:3]
    sch.reorder(channel, tile_outer, i, j, tile_inner)
    sch.parallel(sch.fuse(channel, tile_outer))
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(tile_inner)
