"""BlockMatmulWeights: matmuls with a constant weight take it blocked by output column.

``x[..., M, K] @ W[K, N]`` becomes a kernel reading ``W`` as ``[N / B, K, B]`` (a constant
computed here), B two vector widths: the register tile (a few rows of ``x`` by B columns)
then reads each step's B weights from one cache line instead of B / 16 lines N floats
apart, which on BERT's 768 x 3072 layers thrashed the cache (30 GFLOP/s untiled against
~130 blocked). Float32, and the int8/uint8 x int8 -> int32 matmuls of quantized layers.
The bias, activation and residual add after it fuse into the kernel as before;
``schedules/cpu_matmul.py`` schedules it, found by its block's ``tvmq.kernel`` attribute.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.ir.expr import Constant
from tvmq.schedules.kernel_layouts import MATMUL_BLOCKED as KERNEL_NAME

from ._conv import KERNEL_ATTR, IntDot

# (activation, output) dtypes the kernel computes.
_DTYPES = {("float32", "float32"), ("int8", "int32"), ("uint8", "int32")}


def column_block(columns: int, block: int) -> int | None:
    """``block`` or half of it, whichever divides ``columns`` first."""
    for size in (block, block // 2):
        if size >= 1 and columns % size == 0:
            return size
    return None


def blocked_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [N / block, K, block]."""
    depth, columns = weight.shape
    return np.ascontiguousarray(weight.reshape(depth, columns // block, block).transpose(1, 0, 2))


def grouped_weight(blocked: np.ndarray, group: int) -> np.ndarray:
    """[N/B, K, B] -> [N/B, K/g, B, g]: rows k .. k + g - 1 side by side per column (K a
    multiple of ``group``)."""
    blocks, depth, size = blocked.shape
    return np.ascontiguousarray(
        blocked.reshape(blocks, depth // group, group, size).transpose(0, 1, 3, 2))


def kernel_weight(value: np.ndarray, block: int, form: IntDot,
                  pad: bool = False) -> np.ndarray | None:
    """A [K, N] weight as the blocked kernel reads it: blocked by output column and in the
    widest grouped form, at most ``form``, that divides K; None if no block divides N,
    unless ``pad``: then N is padded with zero columns to whole blocks where that adds at
    most an eighth (a 1000-class classifier: 1024), which the kernel computes and drops
    (``matmul_blocked``'s ``columns``)."""
    size = column_block(value.shape[1], block)
    if size is None:
        extra = -value.shape[1] % block
        if not pad or 8 * extra > value.shape[1]:
            return None
        size, value = block, np.pad(value, ((0, 0), (0, extra)))
    blocked = blocked_weight(value, size)
    group = form.dividing(value.shape[0]).group
    return grouped_weight(blocked, group) if group > 1 else blocked


def matmul_blocked(data, weight, out_dtype: str, columns: int | None = None):
    """out[..., m, n] = sum_k data[..., m, k] * weight[n // B, k, n % B], for the first
    ``columns`` columns when given (a weight padded to whole blocks).

    A 4-d weight ([N/B, K/g, B, g], int8) selects the grouped form: g = 2, the int16 pair
    form (activations first widened to int16, so each (k, k + 1) pair is one 32-bit
    broadcast for vpmaddwd); g = 4, uint8 quads (four consecutive uint8 activations are one
    32-bit broadcast for vpdpbusd, read in place). See schedules/int8_dot.py.
    """
    *batch, rows, depth = (int(d) for d in data.shape)
    group = int(weight.shape[3]) if len(weight.shape) == 4 else 1
    blocks, block = int(weight.shape[0]), int(weight.shape[2])
    if group > 1:
        wide = data if group == 4 else te.compute(
            data.shape, lambda *i: data(*i).astype("int16"), name="data_int16")
        k = te.reduce_axis((0, depth // group), name="k")
        lane = te.reduce_axis((0, group), name="lane")

        def compute(*index):
            *lead, n = index
            return te.sum(
                wide[(*lead, group * k + lane)].astype(out_dtype)
                * weight[n // block, k, n % block, lane].astype(out_dtype),
                axis=[k, lane],
            )
    else:
        k = te.reduce_axis((0, depth), name="k")

        def compute(*index):
            *lead, n = index
            return te.sum(
                data[(*lead, k)].astype(out_dtype)
                * weight[n // block, k, n % block].astype(out_dtype),
                axis=k,
            )

    out = te.compute((*batch, rows, blocks * block), compute, name=KERNEL_NAME,
                     attrs={KERNEL_ATTR: KERNEL_NAME})
    if columns is None or columns == blocks * block:
        return out
    return te.compute((*batch, rows, columns), lambda *i: out(*i), name="crop_columns")


@tvm.transform.module_pass(opt_level=0, name="BlockMatmulWeights")
class BlockMatmulWeights:
    """Rewrite ``matmul(x, constant W)`` as the blocked-weight kernel.

    Runs after constant folding and quantization (weights must be constants) and before
    LegalizeOps. A PyExprMutator rather than a pattern: the replacement is a TE kernel,
    which only a BlockBuilder can add to the module.

    Parameters
    ----------
    block : int, optional
        Columns per weight block (CPU targets: two vector widths); None leaves the
        module unchanged (GPU targets keep their own matmul schedules).
    int_dot : IntDot
        The target's integer multiply: integer matmuls take its grouped form (int16 pairs
        for ``vpmaddwd`` on AVX2, uint8 quads for ``vpdpbusd`` on AVX-512 VNNI).
    """

    def __init__(self, block: int | None, int_dot: IntDot = IntDot.WIDE) -> None:
        self.block = block
        self.int_dot = IntDot(int_dot)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.block is None:
            return mod
        block, int_dot = self.block, self.int_dot

        @relax.expr_functor.mutator
        class _Rewriter(relax.PyExprMutator):
            def visit_call_(self, call: relax.Call) -> relax.Expr:
                call = super().visit_call_(call)
                rewritten = _rewrite(self.builder_, call, block, int_dot)
                return rewritten if rewritten is not None else call

        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()


def _rewrite(
    builder: relax.BlockBuilder, call: relax.Call, block: int, int_dot: IntDot
) -> relax.Expr | None:
    if getattr(call.op, "name", None) != "relax.matmul":
        return None
    data, weight = call.args
    if not isinstance(weight, Constant) or len(weight.ty.shape) != 2:
        return None
    data_ty = data.ty
    if not isinstance(data_ty, relax.TensorType) or data_ty.ndim < 2:
        return None
    try:
        [int(d) for d in data_ty.shape.values]
    except (TypeError, AttributeError):
        return None
    out_dtype = str(call.attrs.out_dtype)
    if out_dtype in ("", "void", "None"):
        out_dtype = str(data_ty.dtype)
    value = weight.value.numpy()
    if (str(data_ty.dtype), out_dtype) not in _DTYPES:
        return None
    if out_dtype == "int32" and value.dtype != np.int8:
        return None
    if out_dtype == "float32" and value.dtype != np.float32:
        return None
    form = int_dot.for_data(str(data_ty.dtype)) if out_dtype == "int32" else IntDot.WIDE
    blocked = kernel_weight(value, block, form)
    if blocked is None:
        return None
    return builder.call_te(matmul_blocked, data, relax.const(blocked), out_dtype,
                           primfunc_name_hint=KERNEL_NAME)

