"""Default CPU schedule for the blocked direct convolution (passes/conv_blocked.py).

The register tile is ``rows`` output pixels (``hi`` rows by ``wi`` columns of the image) by
``vo`` vectors of output channels. Per step of the reduction it loads ``vo`` weight vectors
and broadcasts ``rows`` input values into ``rows * vo`` fused multiply-adds, so the tile is
chosen to use as many accumulators as the vector registers hold beside those loads. Tiles
run in parallel, output-channel block outermost so one block's weights stay in cache
across the image; the fused epilogue runs on each tile while it is in cache.
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
    schedule_injective,
    schedule_prologue,
    schedule_tile_epilogue,
)
from .cpu_tiling import divisor_at_most
from .kernel_layouts import (
    CONV_BLOCKED,
    CONV_DEPTHWISE,
    CONV_POINTWISE,
    CONV_POINTWISE_QUADS,
    DEPTHWISE_PAD,
    pointwise_image_rows,
    pointwise_vectors,
    quad_tile_pixels,
)

# Output vectors per depthwise tile: as many accumulators, each tap's weight broadcast once.
DEPTHWISE_VECTORS = 8


class BlockedConv(CPUScheduleRule):
    """Kernels whose main block is ``conv2d_blocked``, with prologue and epilogue blocks."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = find_kernel(func, CONV_BLOCKED) if self.is_target_available(target) else None
        if found is None:
            return None
        sch, blocks, index = found
        main = blocks[index]
        # Weight [O/B, I, KH, KW, B], or [O/B, I/g, KH, KW, B, g] in a grouped form.
        group, lanes, block, intrinsic = int8_dot.weight_form(
            sch, main, 6, 4, float32_lanes(target))
        loops = sch.get_loops(main)
        extents = [loop_extent(sch, loop) for loop in loops[:4]]
        if any(e is None for e in extents) or block % lanes:
            return None
        _, _, oh, ow = extents
        hi, wi, vo = choose_tile(oh, ow, block // lanes, num_vector_registers(target))

        prologue, epilogue = accumulate_locally(sch, blocks, index)
        # Accumulators channel-innermost, so each FMA / vpmaddwd / vpdpbusd updates one
        # contiguous vector. In NCHW order a channel vector strides by the tile's pixels; on
        # AVX-512 LLVM writes it with masked scatters and cannot keep the tile in registers
        # (256->256 3x3 at 14x14, 2 threads: 12 GFLOP/s as a 2x2x2 tile, 388 channel-last;
        # AVX2: 1.16 ms against 2.09).
        sch.transform_layout(main, ("write", 0), lambda n, c, y, x: (n, y, x, c))
        n, oc, y, x, *reduction = sch.get_loops(main)
        lane = reduction.pop() if group > 1 else None
        oc_outer, oc_inner = sch.split(oc, factors=[None, vo * lanes])
        y_outer, y_inner = sch.split(y, factors=[None, hi])
        x_outer, x_inner = sch.split(x, factors=[None, wi])
        vectors, vector = sch.split(oc_inner, factors=[vo, lanes])
        inner = [y_inner, x_inner, vectors, vector, *([lane] if lane else [])]
        sch.reorder(oc_outer, n, y_outer, x_outer, *reduction, *inner)
        tile = sch.fuse(oc_outer, n, y_outer, x_outer)
        sch.parallel(tile)
        for loop in (y_inner, x_inner, vectors):
            sch.unroll(loop)
        int8_dot.finish_tile(sch, main, reduction[0], vector, tile, epilogue, intrinsic)
        # The epilogue on the tile: unrolled, each image row's run of the tile (contiguous
        # in NCHW) one vector. As serial loops it took half the time of layers with short
        # reductions (MobileNetV2's 3->32 stem at 224x224, + bias + ReLU: 0.41 ms against
        # 0.20; ResNet-50's layers the same either way).
        *outer, columns = sch.get_loops(epilogue)[1:]
        for loop in outer:
            sch.unroll(loop)
        if (loop_extent(sch, columns) or 1) > 1:
            sch.vectorize(columns)
        for earlier in prologue:
            schedule_prologue(sch, earlier, lanes)
        return sch


class PointwiseConv(CPUScheduleRule):
    """Kernels whose main block is ``conv2d_pointwise`` (passes/conv_to_gemm.py).

    A 1x1 convolution as a matmul over the image: the tile is R output channels (one
    broadcast weight each) by a run of whole image rows (contiguous in NCHW) in whole
    vectors, computed one or two vectors at a time; the epilogue runs on the tile's rows.
    Rows spanning several image rows took 56-wide images on AVX-512 (96->24 at 56x56:
    0.041 ms against 0.22 as the generic GEMM, 64->256 0.32 against 0.44 direct). Measured
    before (AVX2, 2 threads, one image row per tile): 64->256 at 56x56 1.9 ms against 3.0
    as the channel-vector kernel, 256->64 1.35 against 2.1, 16->96 at 112x112 1.35 vs 1.8.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = find_kernel(func, CONV_POINTWISE) if self.is_target_available(target) else None
        if found is None:
            return None
        sch, blocks, index = found
        main = blocks[index]
        lanes = float32_lanes(target)
        rows = int(sch.get(main).reads[-1].source.shape[-1])
        height, width = (loop_extent(sch, loop) for loop in sch.get_loops(main)[2:4])
        image_rows = pointwise_image_rows(height, width, lanes) if height and width else None
        if image_rows is None:
            return None
        pixels = image_rows * width
        vectors = pointwise_vectors(pixels, lanes)
        prologue, epilogue = accumulate_locally(sch, blocks, index)
        n, oc, y, x, k = sch.get_loops(main)
        oc_outer, oc_inner = sch.split(oc, factors=[None, rows])
        y_outer, y_inner = sch.split(y, factors=[None, image_rows])
        p_outer, p_vectors, p_lanes = sch.split(
            sch.fuse(y_inner, x), factors=[None, vectors, lanes])
        sch.reorder(oc_outer, n, y_outer, p_outer, k, oc_inner, p_vectors, p_lanes)
        tile = sch.fuse(oc_outer, n, y_outer)
        sch.parallel(tile)
        sch.unroll(oc_inner)
        sch.unroll(p_vectors)
        sch.vectorize(p_lanes)
        sch.decompose_reduction(main, k)
        sch.reverse_compute_at(epilogue, tile)
        if image_rows > 1:
            sch.fuse(*sch.get_loops(epilogue)[-2:])
        schedule_tile_epilogue(sch, epilogue, lanes)
        for earlier in prologue:
            schedule_prologue(sch, earlier, lanes)
        return sch


class PointwiseQuadConv(CPUScheduleRule):
    """Kernels whose main block is ``conv2d_pointwise_quads`` (passes/conv_to_gemm.py).

    The pointwise tile (R output channels by one or two vectors of whole image rows'
    pixels), each step one ``vpdpbusd`` per channel and vector: 16 pixels' uint8 channel
    quads times the channel's broadcast weight quad. The input's copy to quads runs first,
    over the whole image, in parallel. Measured (AVX-512 VNNI, 2 threads, lone layers;
    against the blocked direct int8 kernel, or TVM's conv where 24 channels do not block):
    16->96 at 112x112 0.17 / 0.39 ms, 96->24 at 56x56 0.07 / 0.25, 144->24 0.11 / 0.36,
    64->256 0.20 / 0.35, 256->64 0.26 / 0.36, 128->512 at 28x28 0.14 / 0.19, 512->128 0.18
    / 0.22, 192->32 0.042 / 0.045.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = (find_kernel(func, CONV_POINTWISE_QUADS)
                 if self.is_target_available(target) else None)
        if found is None:
            return None
        sch, blocks, index = found
        main = blocks[index]
        lanes = float32_lanes(target)
        weight_blocks, quads, rows, _ = (int(d) for d in sch.get(main).reads[-1].source.shape)
        unflatten = sch.get(blocks[index + 1]).writes[0].source
        height, width = (int(d) for d in unflatten.shape[2:])
        if lanes != 16:
            return None
        pixels = quad_tile_pixels(height, width, lanes)
        padded = pixels > height * width
        vectors = pointwise_vectors(pixels, lanes)
        if padded:
            # The image padded to whole vectors (14x14, 7x7): the tile's accumulators are
            # written back flat, and the epilogue reads them as the image in a pass of its
            # own (under the tile, TVM cannot tell which pixels a tile's flat run holds).
            prologue, writeback, epilogue = accumulate_locally(sch, blocks, index,
                                                               keep_writeback=True)
        else:
            prologue, writeback = accumulate_locally(sch, blocks, index)
        n, oc, p, k, i = sch.get_loops(main)
        oc_outer, oc_inner = sch.split(oc, factors=[None, rows])
        p_outer, p_tile = sch.split(p, factors=[None, pixels])
        p_steps, p_vectors, p_lanes = sch.split(p_tile, factors=[None, vectors, lanes])
        if 4 * quads > weight_blocks * rows:
            # A reduction: the tile's input (all its quads) stays in cache across the
            # output channels. 256->64 at 56x56 0.26 ms against 0.39 channel-block outer.
            sch.reorder(n, p_outer, oc_outer, p_steps, k, oc_inner, p_vectors, p_lanes, i)
            tile = sch.fuse(n, p_outer, oc_outer)
        else:
            # An expansion: each thread writes whole output planes in turn (16->96 at
            # 112x112 0.17 ms against 0.31 pixel-block outer).
            sch.reorder(oc_outer, n, p_outer, p_steps, k, oc_inner, p_vectors, p_lanes, i)
            tile = sch.fuse(oc_outer, n, p_outer)
        sch.parallel(tile)
        sch.unroll(oc_inner)
        sch.unroll(p_vectors)
        init = sch.decompose_reduction(main, k)
        sch.reverse_compute_at(writeback, tile)
        if pixels > width:
            sch.fuse(*sch.get_loops(writeback)[-2:])
        schedule_tile_epilogue(sch, writeback, lanes)
        if padded:
            schedule_injective(sch, epilogue, lanes)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(p_lanes, int8_dot.register_pixel_quads())
        for earlier in prologue:
            schedule_prologue(sch, earlier, lanes)
        return sch


class DepthwiseConv(CPUScheduleRule):
    """Kernels whose main block is ``conv2d_depthwise`` (passes/conv_blocked.py).

    Channels run in parallel. Per channel, the stride-phase plane of its padded input is
    copied row by row, then the flattened output is computed a few vectors at a time (one
    load and one multiply-add per tap and vector, the weight broadcast), and the epilogue
    reads it back row by row, cropped to the image.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = find_kernel(func, CONV_DEPTHWISE) if self.is_target_available(target) else None
        if found is None:
            return None
        sch, blocks, index = found
        main = blocks[index]
        lanes = float32_lanes(target)
        n, c, y, x, ry, rx = sch.get_loops(main)
        extents = loop_extent(sch, y), loop_extent(sch, x)
        if None in extents or extents[0] * extents[1] % lanes:
            return None
        wide = extents[0] * extents[1]
        vectors = max(v for v in range(1, DEPTHWISE_VECTORS + 1) if wide // lanes % v == 0)
        prologue, epilogue = accumulate_locally(sch, blocks, index, keep=(DEPTHWISE_PAD,))
        p_outer, p_vectors, p_lanes = sch.split(sch.fuse(y, x), factors=[None, vectors, lanes])
        sch.reorder(n, c, p_outer, ry, rx, p_vectors, p_lanes)
        channel = sch.fuse(n, c)
        sch.parallel(channel)
        for loop in (ry, rx, p_vectors):
            sch.unroll(loop)
        sch.vectorize(p_lanes)
        sch.decompose_reduction(main, ry)
        sch.reverse_compute_at(epilogue, channel)
        schedule_tile_epilogue(sch, epilogue, lanes)
        # The kernel's input planes (the prologue block it reads) are copied in rows as wide
        # as the flattened output's (``extents[1]``).
        reads = [region.source for region in sch.get(main).reads]
        pad = next((b for b in prologue if sch.get(b).name_hint == DEPTHWISE_PAD), None)
        for earlier in prologue:
            written = sch.get(earlier).writes[0].source
            if earlier == pad:
                continue  # computed with its phase planes, below
            if not any(written.same_as(read) for read in reads):
                schedule_injective(sch, earlier, lanes)
                continue
            # The planes are copied per channel, in cache, in whole rows of the flattened
            # output's width (the kernel reads whole rows: no partial last row, whose
            # predicate kept the copy scalar with a branch per value). A strided layer
            # copies its phases from the padded image (itself per channel, whole vectors)
            # with the phase columns innermost, unrolled, which LLVM turns into vector loads
            # and shuffles. Lone, ms, against the copies before (all channels up front, or
            # per channel with a bound check or a partial row): float 96x112x112 stride 2
            # 0.25 / 0.43-0.59, 144x56x56 0.065 / 0.25, 192x28x28 0.027 / 0.086; uint8
            # 96x112x112 0.11-0.12 / 0.30-0.36, 144x56x56 0.034 / 0.118.
            sch.compute_at(earlier, channel)
            if pad is None:
                sch.vectorize(sch.get_loops(earlier)[-1])
                continue
            py, px, i, j = sch.get_loops(earlier)[-4:]
            sch.reorder(py, i, j, px)
            sch.unroll(px)
            sch.compute_at(pad, channel)
            row = sch.get_loops(pad)[-1]
            width = divisor_at_most(loop_extent(sch, row), lanes * 32 // written.dtype.bits)
            sch.vectorize(sch.split(row, factors=[None, width])[1])
        return sch


def choose_tile(oh: int, ow: int, vectors: int, registers: int) -> tuple[int, int, int]:
    """(hi, wi, vo): the register tile with the most accumulators that fit.

    At most ``registers - 4`` accumulators: the weight vectors, a broadcast register and a
    spare stay free (on AVX2, 14 accumulators spilled and ran at 47 GFLOP/s where 7 ran at
    70); and at most 16 with 32 registers (AVX-512, 2 threads, 3x3 layers: 2x7x2 tiles ran
    256->256 at 14x14 at 153 GFLOP/s, 1x7x2 at 445; 2x4x2 ran 64->64 at 56x56 at 419 and
    512->512 at 7x7 at 337, against 354 and 237 as 2x2x2). Ties go to more vectors per pixel,
    then to square tiles, which reread the fewest input values for k x k windows. Measured
    on ResNet-50's 3x3 layers (AVX2, 2 threads): 2x2 pixels x 2
    vectors ran at ~140 GFLOP/s against ~100 for 1x4 x 2 and 1x7 x 1.
    """
    best, best_key = (1, 1, 1), None
    for vo in range(1, vectors + 1):
        if vectors % vo:
            continue
        rows = min(registers - 4, 16) // vo
        for hi in _divisors(oh):
            for wi in _divisors(ow):
                if hi * wi > rows:
                    continue
                key = (hi * wi * vo, vo, -abs(hi - wi), wi)
                if best_key is None or key > best_key:
                    best, best_key = (hi, wi, vo), key
    return best


def _divisors(extent: int) -> list[int]:
    return [d for d in range(1, extent + 1) if extent % d == 0]
