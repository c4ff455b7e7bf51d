"""Default CUDA schedules for multiply-accumulate kernels on tensor cores (sm_80 and later).

Runs as a dlight rule after FuseTIR, ahead of TVM's own GPU rules (``dl.gpu.Matmul``...),
which it falls back to for everything it does not take. A kernel is taken when its one
reduction block is a matmul in TVM's sense (``C[S, I, J] += A[S, I, K] * B[S, J, K]`` after
reindexing: matmul, batch matmul, dense, and the GEMM of a convolution rewritten by
ConvToGemm) with static I, J, K of at least one tensor-core tile and a dtype pair that
the WMMA intrinsics registered in ``tvm.s_tir.tensor_intrin.cuda`` cover:

====================  ===================  =======================================
inputs                accumulator          intrinsic (``wmma::mma_sync`` -> mma.sync)
====================  ===================  =======================================
float16               float32 or float16   16x16x16 f16
int8                  int32                16x16x16 s8
int4 (packed bytes)   int32                8x8x32 s4 (see ``cuda_int4.py``)
====================  ===================  =======================================

TVM ships the first two as ``MatmulTensorization`` / ``MatmulInt8Tensorization``, but in
0.27 only the fp16 one is reached through ``dl.gpu.Matmul`` (and only when every dimension
exceeds 64), and the int8 one crashes InjectSoftwarePipeline ("GetWmmaFragmentSize"): its
inner K loop has extent 1, so the pipeline annotation on it names a loop that is gone.
This rule is the same schedule (shared-memory staging with a two-stage software pipeline,
WMMA fragments, store through shared memory, fused epilogue) with the tile shape chosen
from the problem size, so a 16-channel convolution tensorizes too.

Nothing here runs the kernels: the tests check the generated CUDA, and the numeric tests
need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

_WARP = 32
# Elements one thread copies per load when staging into shared memory. Wider vectors hit
# CUDA codegen bugs in 0.27: 8 x int8 zero padding prints make_int2 with 8 arguments, and
# an 8 x float16 gather (a K-major operand) prints make_uint4 with 8 halves.
_VECTOR_LANES = 4
# (inputs, accumulator) pairs that the WMMA 16x16x16 intrinsics cover.
_WMMA_DTYPES = {("float16", "float32"), ("float16", "float16"), ("int8", "int32")}


@dataclass(frozen=True)
class Tile:
    """How the tensor-core tiles of one kernel are laid out over warps and K steps."""

    warps_i: int
    frags_i: int
    warps_j: int
    frags_j: int
    k_steps: int  # WMMA K steps per shared-memory stage

    def pad(self, micro: tuple[int, int, int]) -> list[int]:
        m, n, k = micro
        return [1, m * self.warps_i * self.frags_i, n * self.warps_j * self.frags_j,
                k * self.k_steps]


def choose_tile(extents: tuple[int, int, int], micro: tuple[int, int, int]) -> Tile:
    """The largest tile (up to 4 x 2 warps of 2 x 2 fragments, 4 K steps) the problem fills."""

    def split(extent: int, size: int, shapes) -> tuple[int, int]:
        return next(s for s in shapes if s[0] * s[1] * size <= max(extent, size))

    # At most 128 x 64 outputs per block: their int32 / fp32 staging tile (34 KiB) then
    # fits in static shared memory, see stage_wmma.
    wi, fi = split(extents[0], micro[0], ((4, 2), (2, 2), (2, 1), (1, 1)))
    wj, fj = split(extents[1], micro[1], ((2, 2), (2, 1), (1, 1)))
    k_steps = next(s for s in (4, 2, 1) if s * micro[2] <= max(extents[2], micro[2]))
    return Tile(wi, fi, wj, fj, k_steps)


def matmul_extents(sch: s_tir.Schedule, block) -> tuple[int, int, int] | None:
    """Static (I, J, K) of a block already normalized to [S, I, J, K]; None if symbolic."""
    extents = [iv.dom.extent for iv in sch.get(block).iter_vars[1:]]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return tuple(int(e) for e in extents)


def normalize_matmul(sch: s_tir.Schedule, block) -> bool:
    """Reindex ``block`` into C[S, I, J] += A[S, I, K] * B[S, J, K]; False if it is no matmul."""
    if get_index_map(sch.get(block)) is None:
        return False
    reindex_a = sch.reindex(block, ("read", 0))
    reindex_b = sch.reindex(block, ("read", 1))
    reindex_c = sch.reindex(block, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(block))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(block, matmul_map)
    return True


class TensorCoreMatmul(GPUScheduleRule):
    """fp16 and int8 matmul-like kernels on WMMA tensor cores (``wmma::mma_sync``).

    Parameters
    ----------
    min_flops : int
        Kernels with fewer multiply-adds (I * J * K) stay with the SIMT rules: their
        padding to whole tiles would cost more than the tensor cores save.
    """

    def __init__(self, min_flops: int = 16 * 16 * 16):
        self.min_flops = min_flops

    def is_target_available(self, target: Target) -> bool:
        return super().is_target_available(target) and sm_version(target) >= 80

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if "dlight.do_not_tensorize" in func.attrs.keys():
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        dtypes = _in_out_dtypes(sch.get(main))
        if dtypes not in _WMMA_DTYPES or not normalize_matmul(sch, main):
            return None
        extents = matmul_extents(sch, main)
        if extents is None or min(extents) < 16 or _product(extents) < self.min_flops:
            return None
        try:
            schedule_wmma(sch, main, dtypes, choose_tile(extents, (16, 16, 16)))
        except s_tir.schedule.ScheduleError:
            return None
        return sch


def schedule_wmma(sch: s_tir.Schedule, block, dtypes: tuple[str, str], tile: Tile) -> None:
    """Tile, stage and tensorize a normalized [S, I, J, K] matmul block with WMMA 16x16x16."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    in_dtype, out_dtype = dtypes
    intrins = get_wmma_intrin_group(
        load_scope="shared.dyn", store_scope="shared",
        in_dtype=in_dtype, out_dtype=out_dtype, trans_b=True,
    )
    elem_bytes = 2 if in_dtype == "float16" else 1
    sch.pad_einsum(block, tile.pad((16, 16, 16)))
    stage_wmma(sch, block, (16, 16, 16), tile, intrins, _VECTOR_LANES, pad=16 // elem_bytes)


def stage_wmma(sch: s_tir.Schedule, block, micro, tile: Tile, intrins: dict[str, str],
               vector: int, pad: int, fragments=None, packing: int = 1) -> None:
    """The shared schedule of every WMMA kernel: tiles, staging, fragments, tensorize.

    ``block`` is a matmul block over [S, I, J, K] (or [I, J, K]) whose extents are whole
    tiles (``sch.pad_einsum`` first otherwise). ``intrins`` names the init / load_a /
    load_b / compute / store intrinsics; ``vector`` is how many input elements one thread
    copies per load and ``pad`` the row padding (elements) of the shared-memory tiles,
    which keeps fragment loads free of bank conflicts. ``fragments(sch, outer)`` returns
    the blocks that fill the A and B fragments (default: copies of the inputs); their
    first input is staged in shared memory, ``packing`` elements to a stored element.
    """
    m, n, k = micro
    *batch, i, j, kk = sch.get_loops(block)
    i, i_inner = sch.split(i, [None, m])
    j, j_inner = sch.split(j, [None, n])
    kk, k_inner = sch.split(kk, [None, k])
    sch.reorder(i, j, kk, i_inner, j_inner, k_inner)
    block_inner = block
    block_outer = sch.blockize(i_inner)

    i0, i1, i2, i3 = sch.split(i, [None, 1, tile.warps_i, tile.frags_i])
    j0, j1, j2, j3 = sch.split(j, [1, None, tile.warps_j, tile.frags_j])
    k0, k1 = sch.split(kk, [None, tile.k_steps])
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    if batch:
        sch.bind(batch[0], "blockIdx.z")
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")
    thread_y = sch.fuse(j2, i2)
    sch.bind(thread_y, "threadIdx.y")
    warps = tile.warps_i * tile.warps_j
    rows_a, rows_b = m * tile.warps_i * tile.frags_i, n * tile.warps_j * tile.frags_j

    def fetch(consumer, rows: int, cols: int):
        copy = sch.cache_read(consumer, 0, "shared.dyn")
        sch.compute_at(copy, k0)
        fused = sch.fuse(*sch.get_loops(copy)[-2:])
        # Every thread copies whole vectors: no predicate on a vectorized loop.
        lanes = vector
        while lanes > 1 and (rows * cols) % (warps * _WARP * lanes):
            lanes //= 2
        _, ty, tx, vec = sch.split(fused, [None, warps, _WARP, lanes])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        sch.storage_align(copy, 0, axis=-2, factor=2 * pad, offset=pad)
        sch.annotate(copy, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(copy, "double_buffer_scope", 0)
        auto_inline_producers(sch, copy)
        return copy

    if fragments is None:
        a_frag = sch.cache_read(block_outer, 0, "wmma.matrix_a")
        b_frag = sch.cache_read(block_outer, 1, "wmma.matrix_b")
    else:
        a_frag, b_frag = fragments(sch, block_outer)
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    fetch(a_frag, rows_a, k * tile.k_steps // packing)
    fetch(b_frag, rows_b, k * tile.k_steps // packing)
    # The accumulators go out through static shared memory: in the dynamic pool,
    # MergeSharedMemoryAllocations (0.27) may hand the store a float16 / int8 alias of
    # the region it reuses, which LowerIntrin then rejects ("tvm_access_ptr element type
    # must match the source buffer").
    out_shared = sch.cache_write(block_outer, 0, "shared")
    store = sch.cache_write(block_outer, 0, "wmma.accumulator")
    sch.storage_align(store, 0, -2, 16, 4)
    sch.reverse_compute_at(store, thread_y)
    sch.reverse_compute_at(out_shared, thread_y)
    tile_2d(sch, store, m, n)
    init = sch.decompose_reduction(block_outer, k0)

    tile_2d(sch, a_frag, m, k, unroll=True)
    sch.tensorize(sch.get_loops(a_frag)[-2], intrins["load_a"])
    tile_2d(sch, b_frag, n, k, unroll=True)
    sch.tensorize(sch.get_loops(b_frag)[-2], intrins["load_b"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrins["store"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrins["compute"])

    # Two-stage pipeline: the next K tile is copied into shared memory while this one is
    # multiplied. With one K step per stage the inner loop vanishes and with it the body
    # these orders describe (TVM's int8 rule crashes on exactly that).
    if tile.k_steps > 1:
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])

    auto_inline_consumer_chain(sch, out_shared)
    fused = sch.fuse(*sch.get_loops(out_shared)[-2:])
    _, tx, vec = sch.split(fused, [None, _WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def sm_version(target: Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = arch.removeprefix("sm_").rstrip("a")
    return int(digits) if digits.isdigit() else -1


def tile_2d(sch: s_tir.Schedule, block, rows: int, cols: int, unroll: bool = False) -> None:
    i, j = sch.get_loops(block)[-2:]
    i0, i1 = sch.split(i, [None, rows])
    j0, j1 = sch.split(j, [None, cols])
    sch.reorder(i0, j0, i1, j1)
    if unroll:
        sch.unroll(i0)
        sch.unroll(j0)


def _in_out_dtypes(block: s_tir.SBlock) -> tuple[str, str]:
    out_buffer = block.writes[0].source
    reads = {str(r.source.dtype) for r in block.reads if not r.source.same_as(out_buffer)}
    out = str(out_buffer.dtype)
    return (reads.pop() if len(reads) == 1 else "mixed", out)


def _product(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result
