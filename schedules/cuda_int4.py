"""int4 matmul on CUDA tensor cores through the s4 WMMA 8x8x32 intrinsic (sm_80, sm_86, sm_89).

TVM registers ``wmma_sync_8x8x32_s4s4s32_trans`` but no rule of its own uses it, and its
int4 buffers cannot come from the graph: tvmq keeps int4 values in int8 containers and,
where they are stored, packs two per byte (DESIGN.md). So the int4 kernel is written
by realize (``passes/_int4.py`` ``int4_matmul``, for W4A4 matmuls on these targets),
with the form this rule recognizes:

* operands are packed bytes: ``a[M, K/2]`` and ``b[N, K/2]`` (int8, element ``2q`` in the
  low nibble of byte ``q`` and ``2q + 1`` in the high one: the order the s4 fragments
  use, so a packed row is copied to shared memory unchanged). ``b`` is the weight
  transposed (K-major, the col_major ``matrix_b`` of the intrinsic). ``pack_int4_rows`` packs
  a constant weight at compile time; ``pack_int4_te`` packs an activation at run time;
* two ``unpack_*`` blocks read one nibble each into an ``int4`` buffer
  (``int4(byte >> 4 * (k % 2))``: the cast keeps the low four bits, two's complement);
* ``C[i, j] += int32(A4[i, k]) * int32(B4[j, k])``, with any elementwise epilogue after it.

The rule stages the packed bytes in shared memory and turns each ``unpack`` block into
a fragment load: ``wmma::load_matrix_sync`` into a ``fragment<matrix_a, 8, 8, 32,
experimental::precision::s4, row_major>`` straight from the packed bytes, which is the
intrinsic registered here (``wmma_load_8x8x32_s4_*_packed``). The int4 buffers never
exist in memory: on a CPU (whose codegen mishandles int4) this kernel computes nothing.
M and N must be multiples of 8 and K of 32; the rule does not pad.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.target import Target

from .cuda import Tile, sm_version, stage_wmma

_MICRO = (8, 8, 32)
_LOAD_A = "wmma_load_8x8x32_s4_a_packed_shared_dyn"
_LOAD_B = "wmma_load_8x8x32_s4_b_trans_packed_shared_dyn"
_INTRINS = {
    "init": "wmma_fill_8x8x32_s32",
    "load_a": _LOAD_A,
    "load_b": _LOAD_B,
    "compute": "wmma_sync_8x8x32_s4s4s32_trans",
    "store": "wmma_store_8x8x32_s32_shared",
}


def int4_tensor_cores(target: Target) -> bool:
    """Whether the target has s4 WMMA: sm_75..sm_89 (sm_90 dropped it from the fast path)."""
    return target.kind.name == "cuda" and 75 <= sm_version(target) < 90


class Int4TensorCoreMatmul(GPUScheduleRule):
    """The kernel of :func:`int4_matmul` (plus epilogue) on s4 WMMA tensor cores."""

    def is_target_available(self, target: Target) -> bool:
        return super().is_target_available(target) and int4_tensor_cores(target)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        unpack = _unpack_producers(sch, main)
        if unpack is None:
            return None
        extents = [int(iv.dom.extent) for iv in sch.get(main).iter_vars]
        tile = _choose_tile(extents)
        if tile is None:
            return None
        register_packed_loads()

        def fragments(sch, _outer):
            a_unpack, b_unpack = unpack
            sch.set_scope(a_unpack, 0, "wmma.matrix_a")
            sch.set_scope(b_unpack, 0, "wmma.matrix_b")
            return a_unpack, b_unpack

        try:
            # 16 bytes (32 int4) of padding per shared row: fragment loads of a 32-element
            # row stay 128-bit aligned and do not conflict on banks.
            stage_wmma(sch, main, _MICRO, tile, _INTRINS, vector=4, pad=16,
                       fragments=fragments, packing=2)
        except s_tir.schedule.ScheduleError:
            return None
        return sch


def _unpack_producers(sch: s_tir.Schedule, main):
    """The (unpack A, unpack B) blocks feeding ``main`` when it is an int4 x int4 matmul."""
    stmt = sch.get(main)
    if str(stmt.writes[0].source.dtype) != "int32" or len(stmt.iter_vars) != 3:
        return None
    producers = {str(sch.get(b).writes[0].source.name): b for b in sch.get_producers(main)}
    found = []
    for region in stmt.reads:
        buffer = region.source
        if buffer.same_as(stmt.writes[0].source):
            continue
        if str(buffer.dtype) != "int4" or str(buffer.name) not in producers:
            return None
        found.append(producers[str(buffer.name)])
    return tuple(found) if len(found) == 2 else None


def _choose_tile(extents) -> Tile | None:
    rows, cols, depth = extents
    if rows % 8 or cols % 8 or depth % 32:
        return None

    def split(extent, shapes):
        return next(s for s in shapes if extent % (8 * s[0] * s[1]) == 0)

    wi, fi = split(rows, ((4, 2), (2, 2), (2, 1), (1, 1)))
    wj, fj = split(cols, ((2, 4), (2, 2), (2, 1), (1, 1)))
    k_steps = next(s for s in (4, 2, 1) if depth % (32 * s) == 0)
    return Tile(wi, fi, wj, fj, k_steps)


_REGISTERED = []


def register_packed_loads() -> None:
    """Register the fragment loads from packed bytes (once; imports TVM's CUDA intrinsics)."""
    if _REGISTERED:
        return
    from tvm.s_tir.tensor_intrin import cuda  # registers the s4 sync / fill / store

    s_tir.TensorIntrin.register(_LOAD_A, *_packed_load(is_b=False), override=True)
    s_tir.TensorIntrin.register(_LOAD_B, *_packed_load(is_b=True), override=True)
    _REGISTERED.append(cuda)


def _packed_load(is_b: bool):
    """wmma.load_matrix_sync of an 8 x 32 int4 fragment from 8 x 16 packed bytes."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_fragment_index
    from tvm.script import tirx as T

    scope = "wmma.matrix_b" if is_b else "wmma.matrix_a"
    layout = "col_major" if is_b else "row_major"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8, 16), "int8", align=64, offset_factor=16, scope="shared.dyn")
        C = T.match_buffer(c, (8, 32), "int4", align=64, offset_factor=32, scope=scope)
        with T.sblock("root"):
            T.reads(A[0:8, 0:16])
            T.writes(C[0:8, 0:32])
            for i, k in T.grid(8, 32):
                with T.sblock("load"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    C[vi, vk] = T.Cast(
                        "int4", T.shift_right(A[vi, vk // 2], T.Cast("int8", vk % 2 * 4))
                    )

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (8, 16), "int8", align=64, offset_factor=16, scope="shared.dyn",
                           strides=[s1, s0])
        C = T.match_buffer(c, (8, 32), "int4", align=64, offset_factor=32, scope=scope,
                           strides=[d1, d0])
        with T.sblock("root"):
            T.reads(A[0:8, 0:16])
            T.writes(C[0:8, 0:32])
            # The row stride is counted in int4 elements: two per packed byte.
            T.evaluate(T.tvm_load_matrix_sync(
                C.data, 8, 8, 32, get_wmma_fragment_index(C, d1, 8, 32),
                A.access_ptr("r"), s1 * 2, layout, dtype="void",
            ))

    return desc, impl
