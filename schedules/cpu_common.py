"""Helpers shared by the CPU default schedule rules."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule.schedule import ScheduleError
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features

from .kernel_layouts import KERNEL_ATTR, UNPACK_INT4, int4_run_dims

_DATA_PAR, _COMM_REDUCE = 0, 2


def vector_bits(target: Target) -> int:
    """Width of the widest vector register the target's code may use."""
    if "mtriple" in target.attrs and str(target.attrs["mtriple"]).startswith("aarch64"):
        return 128
    if llvm_cpu_has_features(["avx512f"], target):
        return 512
    if llvm_cpu_has_features(["avx2"], target) or llvm_cpu_has_features(["avx"], target):
        return 256
    return 128


def weight_block(target: Target) -> int | None:
    """Output channels (columns) per weight block of the blocked convolution and matmul
    kernels: two float32 vectors on CPUs (the register tile's width), None elsewhere (GPUs
    keep TVM's conv2d and matmul with their own schedules)."""
    if target.kind.name != "llvm":
        return None
    return 2 * float32_lanes(target)


def float32_lanes(target: Target) -> int:
    """float32 (and int32) values per vector register."""
    return vector_bits(target) // 32


def num_vector_registers(target: Target) -> int:
    if llvm_cpu_has_features(["avx512f"], target):
        return 32
    if "mtriple" in target.attrs and str(target.attrs["mtriple"]).startswith("aarch64"):
        return 32
    return 16


def top_level_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """'S' for each data-parallel block iterator, 'R' for each reduction one."""
    kinds = []
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == _DATA_PAR:
            kinds.append("S")
        elif iv.iter_type == _COMM_REDUCE:
            kinds.append("R")
        else:
            kinds.append("O")
    return "".join(kinds)


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def out_dtype_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def schedule_injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Parallelize the outer loops of a spatial loop nest and vectorize its innermost loop."""
    loops = sch.get_loops(block)
    if not loops or "R" in iter_kinds(sch, block):
        return
    extent = loop_extent(sch, loops[-1])
    vector = None
    if extent is not None and extent > lanes and extent % lanes == 0:
        *outer, vector = sch.split(loops[-1], factors=[None, lanes])
        outer = [*loops[:-1], *outer]
    elif extent is not None and 2 <= extent <= 2 * lanes:
        *outer, vector = loops
    else:
        # Not vectorizable: the innermost loop stays serial (fusing it too puts a division
        # and a modulo on every element: a padded 64x114x114 copy ran 10x slower fused).
        outer = list(loops[:-1]) or list(loops)
    if vector is not None:
        sch.vectorize(vector)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def schedule_prologue(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A kernel's prologue block: ``schedule_injective``, except the stage that widens packed
    int4 weights, which unpacks each run's bytes (half a run, contiguous) into its two
    halves, one vector each, all runs in parallel. (Vectorized as a plain copy, each weight
    read its byte at flat // 2 with a shift by flat % 2: MobileNetV2's int4 classifier,
    1280 x 1000, took 0.45 ms against the INT8 one's 0.04.)"""
    if sch.get(block).name_hint == UNPACK_INT4:
        # The block's loops are the weight's dimensions, so its run is their last ``count``.
        count = int4_run_dims(sch.get(block).writes[0].source.shape)
        loops = sch.get_loops(block)
        if 0 < count < len(loops):
            inner = sch.fuse(*loops[-count:]) if count > 1 else loops[-1]
            high, byte = sch.split(inner, factors=[2, None])
            sch.unroll(high)
            sch.vectorize(byte)
            outer = loops[:-count]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            return
    schedule_injective(sch, block, lanes)


def schedule_tile_epilogue(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize the innermost loop of an epilogue that was moved under a tile loop: by
    ``lanes``, whole if at most two vectors long, else by its largest divisor up to two
    vectors (a 56-wide row as two 28-wide vectors)."""
    loops = sch.get_loops(block)
    extent = loop_extent(sch, loops[-1]) if loops else None
    if extent is None or extent < 2:
        return
    if extent <= 2 * lanes:
        sch.vectorize(loops[-1])
        return
    step = lanes if extent % lanes == 0 else max(
        d for d in range(1, 2 * lanes + 1) if extent % d == 0)
    if step > 1:
        sch.vectorize(sch.split(loops[-1], factors=[None, step])[1])


def annotated_block(sch: s_tir.Schedule, blocks: list, attr: str, value: str) -> int | None:
    """Index in ``blocks`` of the first block whose annotation ``attr`` is ``value`` (how the
    rules find the kernels tvmq's passes emit), or None."""
    for index, block in enumerate(blocks):
        if str(sch.get(block).annotations.get(attr, "")) == value:
            return index
    return None


def inline_epilogue_inputs(sch: s_tir.Schedule, earlier: list, main,
                           keep: tuple[str, ...] = ()) -> list:
    """Inline the blocks before ``main`` that only the epilogue reads (a quantized residual's
    dequantize, say): the epilogue moves under the kernel's tile loop, which its producers
    must then be computable from. Returns the blocks left (the kernel's own prologue);
    blocks named in ``keep`` stay in it."""
    reads = [region.source for region in sch.get(main).reads]
    kept = []
    for block in earlier:
        written = sch.get(block).writes[0].source
        if any(written.same_as(read) for read in reads) or sch.get(block).name_hint in keep:
            kept.append(block)
            continue
        try:
            sch.compute_inline(block)
        except ScheduleError:
            kept.append(block)
    return kept


def find_kernel(func, name: str):
    """(schedule, top-level blocks, index of the block annotated ``tvmq.kernel = name``) for
    a PrimFunc holding one of tvmq's kernels, or None."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = top_level_blocks(sch)
    index = annotated_block(sch, blocks, KERNEL_ATTR, name)
    return None if index is None else (sch, blocks, index)


def accumulate_locally(sch: s_tir.Schedule, blocks: list, index: int, *,
                       keep_writeback: bool = False, keep: tuple[str, ...] = ()):
    """Give the kernel ``blocks[index]`` a local accumulator and fold the elementwise
    epilogue into one block that reads it. Returns (prologue blocks, epilogue block).

    ``keep_writeback``: the accumulator's copy out stays a block of its own, and the
    epilogue folds into the last block only; returns (prologue, copy-out, epilogue).
    ``keep``: prologue blocks (by name) not to inline."""
    main = blocks[index]
    prologue = inline_epilogue_inputs(sch, blocks[:index], main, keep)
    writeback = sch.cache_write(main, 0, "local")
    epilogue = [*([] if keep_writeback else [writeback]), *blocks[index + 1 :]]
    for later in epilogue[:-1]:
        sch.compute_inline(later)
    if keep_writeback:
        return prologue, writeback, epilogue[-1]
    return prologue, epilogue[-1]

