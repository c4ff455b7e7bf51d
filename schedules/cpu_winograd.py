"""Default CPU schedule for tvmq's Winograd convolution kernel (passes/winograd.py).

Stages: the padded input, its columns transformed (input_rows: combinations of image rows,
vectorized along the row), each tile's rows transformed (data_pack, vectorized across the
tiles of a tile row, reading the input_rows of that tile row, computed just before it and
still in cache), a batched matrix multiply with the pre-transformed weight (bgemm: nearly
all the arithmetic), the inverse transform, and the gather into NCHW with the fused
epilogue. The transforms unroll their small (eps, nu) loops so their constant
coefficients fold; bgemm gets the register tiling of every multiply-accumulate kernel.
Big images run band by band: one parallel loop over tile rows, each computing its input
transform, its GEMM and its inverse (and its output rows, where TVM can place them) while
the band's intermediates are in cache (``_band_tiles`` says when).

meta_schedule cannot search this kernel (schedules/tune.py keeps it on this schedule).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu_common import (
    loop_extent,
    num_vector_registers,
    out_dtype_bits,
    schedule_injective,
    top_level_blocks,
    vector_bits,
)
from .cpu_tiling import accumulator_rows, divisor_at_most, tile_accumulation

_STAGES = ("input_rows", "data_pack", "bgemm", "inverse", "conv2d_winograd")


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
            schedule_injective(sch, blocks["data_pad"], lanes)
        band = _band_tiles(sch, blocks["data_pack"], blocks["input_rows"], blocks["bgemm"])
        band_loop = None
        if band is not None:
            band_loop = _banded(sch, blocks, band, lanes, num_vector_registers(target))
        else:
            _input_transform(sch, blocks["input_rows"], blocks["data_pack"], lanes)
            _inverse_transform(sch, blocks["inverse"], lanes)
            if not tile_accumulation(sch, blocks["bgemm"], [], target):
                return None
        tail = [blocks["conv2d_winograd"], *epilogue]
        output_shape = _shape(sch, tail[0])
        for block in tail[:-1]:
            sch.compute_inline(block)
        # The band's output rows while its inverse tiles are in cache, where TVM can place
        # the tail there: not a concatenation (its rows are not the band's), and not where
        # its region analysis cannot read the tile index back to rows (seen with int64
        # indices in inception_v1); those run as a loop of their own.
        if not (band_loop is not None and _shape(sch, tail[-1]) == output_shape
                and _try_reverse_compute_at(sch, tail[-1], band_loop)):
            schedule_injective(sch, tail[-1], lanes)
        return sch


# Band by band (a tile row at a time) where the transformed input is over BAND_BYTES, a
# tile row's share of it at most BAND_ROW_BYTES (it and its GEMM output stay in cache), and
# the transformed weight, which each band streams whole, adds up to at most
# BAND_WEIGHT_BYTES over the bands. Measured here (AVX-512, 2 threads, lone F(4x4)
# kernels, ms): 64->64 at 56x56 0.83 banded against 0.91 whole-image; 128->128 at 112x112
# 12.3 with a tile row a band against 17.5 with two (the band's share past the L2);
# 256->256 at 56x56 19.9 banded against 12.1 whole (its 9.4 MB weight streamed by each of
# 14 bands). 64->64 at 224x224 ran 22 ms whole-image (stages timed apart), 15-16 banded.
BAND_BYTES = 1 << 20
BAND_ROW_BYTES = 512 << 10
BAND_WEIGHT_BYTES = 96 << 20


def _band_tiles(sch: s_tir.Schedule, pack, rows, bgemm) -> int | None:
    """Tiles per band (one tile row), or None to run each stage over the whole image."""
    shape = [int(d) for d in sch.get(pack).writes[0].source.shape]
    alpha, channels, tiles = shape[0], shape[2], shape[3]
    out_channels = int(sch.get(bgemm).writes[0].source.shape[2])
    row_tiles = _row_tiles(sch, pack, rows)
    tile_rows = tiles // row_tiles
    total = alpha * alpha * channels * tiles * 4
    weight = alpha * alpha * channels * out_channels * 4
    if (total <= BAND_BYTES or total // tile_rows > BAND_ROW_BYTES
            or tile_rows * weight > BAND_WEIGHT_BYTES or tile_rows < 2):
        return None
    return row_tiles


def _banded(sch: s_tir.Schedule, blocks: dict, band: int, lanes: int, registers: int) -> None:
    """Bands of tiles in parallel; per band: its input transform, the batched GEMM on its
    tiles, its inverse transform. Anchored at the inverse transform (its reads of the GEMM
    are at constant (eps, nu), which reverse_compute_at cannot place; compute_at moves
    each producer under it)."""
    inverse = blocks["inverse"]
    # Band-major intermediates: a band's tiles are contiguous, so two threads never write
    # one cache line.
    for name in ("data_pack", "bgemm", "inverse"):
        sch.transform_layout(blocks[name], ("write", 0),
                             lambda a, b, c, p: (p // band, a, b, c, p % band))
    channel, vh, vw, tile = sch.get_loops(inverse)
    band_loop, column = sch.split(tile, factors=[None, band])
    sch.reorder(band_loop, channel, vh, vw, column)
    sch.parallel(band_loop)
    sch.unroll(vh)
    sch.unroll(vw)
    _vectorize_split(sch, column, lanes)

    bgemm = blocks["bgemm"]
    sch.compute_at(bgemm, band_loop)
    sch.compute_at(blocks["data_pack"], band_loop)
    p_eps, p_nu, p_channel, p_column = sch.get_loops(blocks["data_pack"])[1:]
    sch.reorder(p_channel, p_eps, p_nu, p_column)
    sch.unroll(p_eps)
    sch.unroll(p_nu)
    _vectorize_split(sch, p_column, lanes)
    sch.compute_at(blocks["input_rows"], p_channel)
    row_loops = sch.get_loops(blocks["input_rows"])
    sch.unroll(row_loops[-2])
    _vectorize_split(sch, row_loops[-1], lanes)

    local = sch.cache_write(bgemm, 0, "local")
    _, _, co, tile, ci = sch.get_loops(bgemm)[1:]
    # Vectors of at most ``lanes``: 28 tiles as two vectors of 14 (a 28-lane vector made
    # LLVM spill the accumulator tile, 4-5x slower).
    vector = divisor_at_most(band, lanes)
    block = accumulator_rows(loop_extent(sch, co), -(-vector // lanes), registers)
    co_outer, co_inner = sch.split(co, factors=[None, block])
    tile_outer, tile_inner = sch.split(tile, factors=[None, vector])
    sch.reorder(co_outer, tile_outer, ci, co_inner, tile_inner)
    sch.unroll(co_inner)
    sch.vectorize(tile_inner)
    sch.reverse_compute_at(local, tile_outer)
    sch.vectorize(sch.get_loops(local)[-1])
    sch.decompose_reduction(bgemm, ci)
    return band_loop


def _try_reverse_compute_at(sch: s_tir.Schedule, block, loop) -> bool:
    try:
        sch.reverse_compute_at(block, loop)
    except (s_tir.ScheduleError, ValueError):
        return False
    return True


def _shape(sch: s_tir.Schedule, block) -> list[int]:
    return [int(d) for d in sch.get(block).writes[0].source.shape]


def _vectorize_split(sch: s_tir.Schedule, loop, lanes: int) -> None:
    width = loop_extent(sch, loop)
    if width is None:
        return
    vector = divisor_at_most(width, lanes)
    if vector < width:
        _, loop = sch.split(loop, factors=[None, vector])
    sch.vectorize(loop)


def _input_transform(sch: s_tir.Schedule, rows, pack, lanes: int) -> None:
    """data_pack's loops as (channel, tile row) in parallel, then (eps, nu) unrolled, then
    the tiles of the row as one vector; input_rows computed per (channel, tile row) there."""
    eps, nu, channel, tile = sch.get_loops(pack)
    row_tiles = _row_tiles(sch, pack, rows)
    tile_row, column = sch.split(tile, factors=[None, row_tiles])
    sch.reorder(channel, tile_row, eps, nu, column)
    outer = sch.fuse(channel, tile_row)
    sch.parallel(outer)
    sch.unroll(eps)
    sch.unroll(nu)
    _vectorize_split(sch, column, lanes)
    sch.compute_at(rows, outer)
    row_loops = sch.get_loops(rows)
    sch.unroll(row_loops[-2])
    _vectorize_split(sch, row_loops[-1], lanes)


def _row_tiles(sch: s_tir.Schedule, pack, rows) -> int:
    """Tiles per tile row: data_pack holds batch x tile rows x row_tiles tiles, and
    input_rows is [batch, channel, tile row, alpha, width]."""
    tiles = int(sch.get(pack).writes[0].source.shape[3])
    batch, _, tile_rows = (int(d) for d in sch.get(rows).writes[0].source.shape[:3])
    return tiles // (batch * tile_rows)


def _inverse_transform(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Loops (channel, i, j, tile): the (i, j) pair unrolled inside, channel and groups of
    tiles in parallel outside, a vector of tiles innermost."""
    channel, i, j, tile = sch.get_loops(block)
    tile_outer, tile_inner = sch.split(
        tile, factors=[None, divisor_at_most(loop_extent(sch, tile), lanes)])
    sch.reorder(channel, tile_outer, i, j, tile_inner)
    sch.parallel(sch.fuse(channel, tile_outer))
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(tile_inner)
