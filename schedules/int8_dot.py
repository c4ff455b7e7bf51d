"""int8 multiply-accumulate instructions of the blocked kernels: ``vpdpbusd`` (x86 VNNI) on
uint8 quads, ``vpmaddwd`` (AVX2) on int16 pairs, ``sdot`` (AArch64 dot product) on int8 quads.

The blocked kernels' grouped form (passes/conv_blocked.py, passes/matmul_blocked.py) lays
weights out as [..., B output channels, g inputs] and activations as g-channel groups, so
each step of the reduction is one 32-bit broadcast of an activation group, one vector load
of weights and one instruction:

- g = 4, AVX-512 VNNI: ``vpdpbusd`` multiplies 64 uint8 activations by 64 int8 weights and
  adds each four products into one of 16 int32 lanes (64 multiply-adds per instruction);
  activations are uint8 (RealizeQuantization shifts them by 128 for VNNI targets).
- g = 2, AVX2: ``vpmaddwd`` multiplies 16 int16 pairs and adds each pair into one of 8 int32
  lanes, 16 multiply-adds per instruction, against 8 per two instructions (``vpmulld`` +
  ``vpaddd``) when int8 values are widened to int32.
- g = 4, AArch64 with the dot product extension: ``sdot`` multiplies 16 int8 activations by
  16 int8 weights and adds each four into one of 4 int32 lanes (16 multiply-adds per
  instruction, against 4 for a widening multiply-accumulate).

All are exact: products and group sums fit int32 (``vpdpbusd`` does not saturate).

Measured (2 threads, AVX2, vpmaddwd): 3x3 256->256 at 14x14 172 GOP/s (int32 path 92,
fp32 145); 1x1 1024->256 at 14x14 197 GOP/s (int32 path 84).

The stock ``dot_16x4_vnni`` intrinsic of TVM hands LLVM 22 int32x16 operands where
``llvm.x86.avx512.vpdpbusd.512`` takes <64 x i8>; the one here passes bytes.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

PAIR_DOT_8x2 = "tvmq_int16_pair_dot_8x2_avx2"
QUAD_DOT_16x4 = "tvmq_u8s8_quad_dot_16x4_vnni"
SDOT_4x4 = "tvmq_s8s8_quad_dot_4x4_sdot"
PIXEL_QUAD_DOT_16x4 = "tvmq_u8s8_pixel_quad_dot_16x4_vnni"


def _dot_desc(lanes: int, group: int, a_dtype: str):
    """What both instructions compute: ``C[i] += sum_k A[k] * B[i, k]`` in int32."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, group), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@T.prim_func(s_tir=True)
def _pair_dot_avx2(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "int16", offset_factor=1)
    B = T.match_buffer(b, (8, 2), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        pair = T.reinterpret(A.vload([0], dtype="int16x2"), dtype="int32")
        a16 = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
        b16 = T.cast(B.vload([0, 0], dtype="int8x16"), "int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16, b16, dtype="int32x8"
        )


def _quad_dot(lanes: int, a_dtype: str, instruction: str):
    """``C[0:lanes] += quad dot products`` by one instruction taking (acc, data bytes,
    weight bytes): each lane adds the four products of the broadcast activation quad and
    its four weights (vpdpbusd: uint8 x int8, 16 lanes; sdot: int8 x int8, 4 lanes)."""
    width = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            quad = T.reinterpret(A.vload([0], dtype=f"{a_dtype}x4"), dtype="int32")
            a8 = T.reinterpret(T.broadcast(quad, lanes), dtype=f"int8x{width}")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction),
                C.vload([0], dtype=f"int32x{lanes}"), a8,
                B.vload([0, 0], dtype=f"int8x{width}"), dtype=f"int32x{lanes}",
            )

    return impl


@T.prim_func(s_tir=True)
def _pixel_quad_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (16, 4), "uint8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        for i, k in T.grid(16, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _pixel_quad_vnni(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (16, 4), "uint8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        quad = T.reinterpret(B.vload([0], dtype="int8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(A.vload([0, 0], dtype="uint8x64"), dtype="int8x64"),
            T.reinterpret(T.broadcast(quad, 16), dtype="int8x64"), dtype="int32x16",
        )


def register_pixel_quads() -> str:
    """Register the pixel-lane ``vpdpbusd`` of the quad pointwise kernel (16 pixels' uint8
    quads, one int8 weight quad broadcast: ``C[i] += sum_k A[i, k] * B[k]``); its name."""
    if TensorIntrin.get(PIXEL_QUAD_DOT_16x4, allow_missing=True) is None:
        TensorIntrin.register(PIXEL_QUAD_DOT_16x4, _pixel_quad_desc, _pixel_quad_vnni)
    return PIXEL_QUAD_DOT_16x4


# By (group, activation dtype as the kernel reads it): name, int32 lanes, desc, impl.
_INTRINSICS = {
    (2, "int16"): (PAIR_DOT_8x2, 8, _dot_desc(8, 2, "int16"), _pair_dot_avx2),
    (4, "uint8"): (QUAD_DOT_16x4, 16, _dot_desc(16, 4, "uint8"),
                   _quad_dot(16, "uint8", "llvm.x86.avx512.vpdpbusd.512")),
    (4, "int8"): (SDOT_4x4, 4, _dot_desc(4, 4, "int8"),
                  _quad_dot(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")),
}


def register(group: int, data_dtype: str) -> str:
    """Register the intrinsic for ``group`` channels of ``data_dtype`` activations (once per
    process); returns its name."""
    name, _, desc, impl = _INTRINSICS[(group, data_dtype)]
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, desc, impl)
    return name


def register_all() -> None:
    """Register every intrinsic of this module: records that name one (any int8 kernel's
    default schedule) do not load into meta_schedule before it is registered."""
    for group, dtype in _INTRINSICS:
        register(group, dtype)
    register_pixel_quads()


def weight_form(sch, main, grouped_rank: int, block_axis: int, float_lanes: int):
    """(group, lanes, block, intrinsic) of a blocked kernel from its operands (the block's
    first read is the activation, its last the weight): a weight of rank ``grouped_rank`` is
    the grouped form, ``group`` input channels per accumulator lane (2: int16 pairs, 4:
    uint8 or int8 quads), computed by ``intrinsic`` (registered) ``lanes`` int32 at a time;
    group 1 is the plain form (float lanes, no intrinsic). ``block`` is the weight's extent
    at ``block_axis``."""
    reads = sch.get(main).reads
    weight = reads[-1].source
    group = int(weight.shape[-1]) if len(weight.shape) == grouped_rank else 1
    if group == 1:
        return 1, float_lanes, int(weight.shape[block_axis]), None
    key = (group, str(reads[0].source.dtype))
    return group, _INTRINSICS[key][1], int(weight.shape[block_axis]), register(*key)


def finish_tile(sch, main, first_reduction, vector, tile, epilogue,
                intrinsic: str | None) -> None:
    """The steps a blocked kernel's register tile ends with: the channel vector (or, in a
    grouped form, its ``intrinsic`` over it), the accumulator zeroed once per tile, and
    the epilogue moved under the tile loop. The tensorized block is opaque to
    decompose_reduction and reverse_compute_at, so a grouped form tensorizes after both;
    vectorize must come before decompose_reduction."""
    if intrinsic is None:
        sch.vectorize(vector)
    init = sch.decompose_reduction(main, first_reduction)
    sch.reverse_compute_at(epilogue, tile)
    if intrinsic is not None:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(vector, intrinsic)
