"""int8 multiply-accumulate on x86 without VNNI: ``vpmaddwd`` on int16 pairs.

AVX2 has no int8 dot product (VNNI's ``vpdpbusd``); ``vpmaddwd`` multiplies 16 int16 pairs
and adds each pair into one of 8 int32 lanes, 16 multiply-adds per instruction, against
8 per two instructions (``vpmulld`` + ``vpaddd``) when int8 values are widened to int32.
The blocked kernels' pair form (passes/conv_blocked.py, passes/matmul_blocked.py) lays
weights out as [..., 8 output channels, 2 inputs] (int8, widened on load) and activations
as int16 pairs, so one step is a 32-bit broadcast of the pair, one load and widen of 16
weights, and one ``vpmaddwd``. Exact: products and pair sums fit int32.

Measured (2 threads, this machine's AVX2): 3x3 256->256 at 14x14 172 GOP/s (int32 path 92,
fp32 145); 1x1 1024->256 at 14x14 197 GOP/s (int32 path 84).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

PAIR_DOT_8x2 = "tvmq_int16_pair_dot_8x2_avx2"
LANES = 8  # int32 accumulators per vpmaddwd (256-bit)


@T.prim_func(s_tir=True)
def _pair_dot_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "int16", offset_factor=1)
    B = T.match_buffer(b, (8, 2), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i, k in T.grid(8, 2):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


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


def register() -> str:
    """Register the intrinsic (once per process); returns its name."""
    if TensorIntrin.get(PAIR_DOT_8x2, allow_missing=True) is None:
        TensorIntrin.register(PAIR_DOT_8x2, _pair_dot_desc, _pair_dot_avx2)
    return PAIR_DOT_8x2


def weight_form(sch, main, pair_rank: int, block_axis: int, float_lanes: int):
    """(pairs, lanes, block) of a blocked kernel from its weight buffer (the block's last
    read): a weight of rank ``pair_rank`` is the int16 pair form, which accumulates
    ``LANES`` int32 per vpmaddwd; ``block`` is the weight's extent at ``block_axis``."""
    weight = sch.get(main).reads[-1].source
    pairs = len(weight.shape) == pair_rank
    return pairs, LANES if pairs else float_lanes, int(weight.shape[block_axis])


def finish_tile(sch, main, first_reduction, vector, tile, epilogue, pairs: bool) -> None:
    """The steps a blocked kernel's register tile ends with: the channel vector (or, in the
    pair form, vpmaddwd over it), the accumulator zeroed once per tile, and the epilogue
    moved under the tile loop. The tensorized block is opaque to decompose_reduction and
    reverse_compute_at, so the pair form tensorizes after both; vectorize must come before
    decompose_reduction."""
    if not pairs:
        sch.vectorize(vector)
    init = sch.decompose_reduction(main, first_reduction)
    sch.reverse_compute_at(epilogue, tile)
    if pairs:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(vector, register())

