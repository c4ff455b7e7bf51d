"""RealizeQuantization: turn simulated quantization (QDQ) into integer-only compute.

Runs after ``Calibrate`` (or on a pre-quantized ONNX QDQ model straight after import and
``FoldConstant``) and before ``LegalizeOps``. Each ``quantize(op(dequantize(x), ...))``
becomes the op on the integers: int8 x int8 -> int32 conv2d / matmul with the bias and the
zero-point compensation folded into one int32 constant, then a requantize by a fixed-point
multiplier and rounding right shift (no float inside a layer) and a saturating clamp that
holds a folded ReLU / clip. Residual adds, concats and pools rescale in integers; max-pool
and data movement work on the integers directly. A layer whose output feeds float ops
(or is a model output) ends in one ``dequantize`` of its int32 accumulator. The QDQ pairs
no pattern takes stay as they are: they are the float boundaries.

Weights folded back to float (``FoldConstant`` after annotation, or ONNX QDQ models, whose
weight ``DequantizeLinear`` folds on import) are quantized again symmetric per output
channel, which recovers their integers exactly (at 4 bits when they sit on a 4-bit grid).

Integer weights that fit in int4 ([-8, 7]: a layer annotated with ``weight_bits=4``) are
stored packed two per byte and widened inside the layer's kernel (see ``_int4.py``): one TE
compute, unpack then integer conv2d / matmul, added to the module and called with
``call_tir``, so the artifact holds half the weight bytes. Group-wise INT4 weights
(``QConfig.weight_group_size``: ``q * m`` with a uint8 multiplier ``m`` per group) are split
back into packed ``q`` and ``m``, and the kernel multiplies them while unpacking.

4-bit activations (annotate's ``dequantize(clip(quantize(x), -8, 7))``) keep their clamp as
an integer clip after the producing kernel's requantize. Where the target multiplies int4 by
int4 (``int4_tensor_cores``: CUDA sm_75..sm_89), a matmul or ungrouped convolution with
int4 weights that reads such an activation becomes the packed int4 kernel the s4
tensor-core rule schedules (``_int4.int4_matmul``; a convolution over its pixels' windows,
gathered and packed at run time). Depthwise convolutions keep int4 weights in int8
(``_int4.stores_packed``) and run the INT8 depthwise kernel.

``unsigned_activations=True`` keeps every activation in uint8 with its zero point shifted by
128, the operand form x86 VNNI (u8 x s8) wants; the zero-point compensation in each layer's
bias constant absorbs the shift, so the results are bit-identical.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir.expr import Constant
from tvm.relax.dpl import is_const, is_op, wildcard
from tvmq.schedules.kernel_layouts import int4_run

from . import conv_blocked, conv_to_gemm, matmul_blocked
from ._conv import Conv2D, IntDot
from ._int4 import (
    INT4_MAX,
    INT4_MIN,
    blocked_conv_origin,
    blocked_matmul_origin,
    conv2d_int4,
    factor_groups,
    fits_int4,
    int4_matmul,
    matmul_int4,
    pack_int4,
    pack_int4_rows,
    pack_int4_runs,
    pack_int4_te,
    patch_rows,
    stores_packed,
    unpacked,
)
from ._qdq import (
    QMAX,
    QMIN,
    REPORT_ATTR,
    activation_bounds,
    channel_shape,
    clamp_cast,
    clip_bounds,
    const_value,
    dequantize_pattern,
    fixed_point,
    i64,
    quantize_pattern,
    quantize_weight,
    read_json_attr,
    requantize,
    rounding_shift,
    scalar,
    with_json_attr,
)
from .conv_algorithm import ConvAlgorithm, predict

_POOL_OPS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d",
             "relax.mean")
_MOVE_OPS = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
             "relax.flatten")


class _Patterns:
    """The QDQ shapes realize rewrites; the rewriters read the matched pieces by name."""

    def __init__(self) -> None:
        # A 4-bit activation: the integer clamp to its 16 levels (annotate's narrow point).
        self.x_narrow = is_op("relax.clip")(wildcard(), wildcard(), wildcard())
        self.x = self.x_narrow | wildcard()
        self.dq_x = dequantize_pattern(self.x)
        self.w_int = is_const()
        self.w_dq = dequantize_pattern(self.w_int)
        self.w_float = is_const()
        weight = self.w_dq | self.w_float
        self.conv = is_op("relax.nn.conv2d")(self.dq_x, weight)
        self.matmul = is_op("relax.matmul")(self.dq_x, weight)
        anchor = self.conv | self.matmul
        self.bias = is_const()
        self.biased = is_op("relax.add")(anchor, self.bias)
        self.layer = self.biased | anchor
        self.relu = is_op("relax.nn.relu")(self.layer)
        self.clip = is_op("relax.clip")(self.layer, wildcard(), wildcard())
        self.compute = quantize_pattern(self.relu | self.clip | self.layer)

        self.dq_a, self.dq_b = dequantize_pattern(), dequantize_pattern()
        add = is_op("relax.add")(self.dq_a, self.dq_b)
        self.add_relu = is_op("relax.nn.relu")(add)
        self.add_clip = is_op("relax.clip")(add, wildcard(), wildcard())
        self.add = quantize_pattern(self.add_relu | self.add_clip | add)

        self.concat_op = is_op("relax.concat")(wildcard())
        self.concat = quantize_pattern(self.concat_op)

        self.dq_in = dequantize_pattern()
        self.pool_ops = {
            name: is_op(name)(self.dq_in, varg_default_wildcard=True)
            for name in _POOL_OPS + _MOVE_OPS
        }
        pooled = self.pool_ops[_POOL_OPS[0]]
        for pattern in list(self.pool_ops.values())[1:]:
            pooled = pooled | pattern
        self.pool = quantize_pattern(pooled)


@tvm.transform.module_pass(opt_level=0, name="RealizeQuantization")
class RealizeQuantization:
    """Rewrite QDQ patterns into integer-only kernels.

    Parameters
    ----------
    unsigned_activations : bool
        Keep activations in uint8 (zero point + 128) for u8 x s8 dot products (x86 VNNI).
    weight_block : int, optional
        The CPU blocked kernels' output-channel block (``schedules.cpu_common.weight_block``):
        INT4 layers are then built as those kernels (the int4 weights packed in their
        blocked order and unpacked inside them) instead of a generic integer conv/matmul.
    int_dot : IntDot
        The target's integer multiply, the form of those blocked kernels.
    int4_tensor_cores : bool
        The target multiplies int4 by int4 (CUDA sm_75..sm_89, s4 WMMA): matmuls and convs
        with int4 weights that read 4-bit activations (W4A4) are built as the packed int4 kernel
        that ``schedules/cuda_int4.py`` puts on tensor cores.
    """

    def __init__(self, *, unsigned_activations: bool = False, weight_block: int | None = None,
                 int_dot: IntDot = IntDot.WIDE, int4_tensor_cores: bool = False) -> None:
        self.unsigned_activations = unsigned_activations
        self.weight_block = weight_block
        self.int_dot = int_dot
        self.int4_tensor_cores = int4_tensor_cores

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = mod.clone()
        kernels = _Kernels({gv.name_hint for gv in mod.get_global_vars()},
                           self.weight_block, self.int_dot, self.int4_tensor_cores)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            new = _realize(func, self.unsigned_activations, kernels)
            if not new.same_as(func):
                mod[gv] = new
        for gv, prim in kernels.added:
            mod[gv] = prim
        return mod


class _Kernels:
    """The int4 kernels (unpack fused into conv / matmul) realize adds to the module."""

    def __init__(self, taken: set[str], weight_block: int | None = None,
                 int_dot: IntDot = IntDot.WIDE, int4_tensor_cores: bool = False) -> None:
        self.taken = taken
        self.weight_block = weight_block
        self.int_dot = int_dot
        self.int4_tensor_cores = int4_tensor_cores
        self.builder = relax.BlockBuilder()  # gives each GlobalVar its function type
        self.group_size = 0  # group-wise INT4 weights: annotate's group size, from the report
        self.added: list[tuple[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]] = []

    def add(self, name: str, prim) -> tvm.ir.GlobalVar:
        index = 0
        while f"{name}_{index}" in self.taken:
            index += 1
        name = f"{name}_{index}"
        # No global symbol: once FuseTIR has copied a kernel into its fused function,
        # dead-code elimination drops the unfused original (a global symbol kept it, so it
        # was compiled for nothing); AttachGlobalSymbol names whatever stays.
        # (create_prim_func names every one "main".)
        prim = prim.without_attr("global_symbol")
        gv = self.builder.add_func(prim, name)
        self.taken.add(gv.name_hint)
        self.added.append((gv, prim))
        return gv


def _realize(
    func: relax.Function, unsigned: bool, kernels: _Kernels | None = None
) -> relax.Function:
    if unsigned:
        func = _to_unsigned(func)
    p = _Patterns()
    realized: list[str] = []
    kernels = kernels or _Kernels(set())
    kernels.group_size = int(read_json_attr(func, REPORT_ATTR, {}).get("weight_group_size") or 0)
    func = relax.dpl.rewrite_call(p.compute, _compute_rewriter(p, realized, True, kernels), func)
    func = relax.dpl.rewrite_call(p.add, _add_rewriter(p, realized), func)
    var2val = relax.analysis.get_var2val(func)
    func = relax.dpl.rewrite_call(p.concat, _concat_rewriter(p, var2val, realized), func)
    func = relax.dpl.rewrite_call(p.pool, _pool_rewriter(p, realized), func)
    # Layers that end in float: first with their bias, then bare.
    func = relax.dpl.rewrite_call(p.biased, _compute_rewriter(p, realized, False, kernels),
                                  func)
    func = relax.dpl.rewrite_call(
        p.conv | p.matmul, _compute_rewriter(p, realized, False, kernels), func
    )
    func = relax.analysis.remove_all_unused(func)
    if realized:
        report = read_json_attr(func, REPORT_ATTR, {})
        report["realized"] = realized
        report["unsigned_activations"] = unsigned
        func = with_json_attr(func, REPORT_ATTR, report)
    return func


# ------------------------------------------------------------------------ activations


def _to_unsigned(func: relax.Function) -> relax.Function:
    """int8 activations -> uint8 with the zero point moved by 128 (weights stay int8)."""

    def shift_zero(zero: relax.Expr) -> relax.Expr:
        return relax.const(np.asarray(const_value(zero), "int32") + 128, "uint8")

    def quantize(call, _m):
        if call.attrs.out_dtype != "int8" or scalar(call.args[1]) is None:
            return call
        return relax.op.quantize(call.args[0], call.args[1], shift_zero(call.args[2]),
                                 axis=call.attrs.axis, out_dtype="uint8")

    def dequantize(call, _m):
        data, zero = call.args[0], call.args[2]
        if isinstance(data, Constant) or const_value(zero).dtype != np.int8:
            return call
        if scalar(call.args[1]) is None:
            return call
        return relax.op.dequantize(data, call.args[1], shift_zero(call.args[2]),
                                   axis=call.attrs.axis, out_dtype=call.attrs.out_dtype)

    def clamp(call, m):  # a narrow activation's levels move with its zero point
        q = m[quantized]
        if q.attrs.out_dtype != "int8" or scalar(q.args[1]) is None:
            return call
        lo, hi = clip_bounds(call)
        return relax.op.clip(quantize(q, m), int(lo) + 128, int(hi) + 128)

    quantized = quantize_pattern()
    narrow = is_op("relax.clip")(quantized, wildcard(), wildcard())
    func = relax.dpl.rewrite_call(narrow, clamp, func)
    func = relax.dpl.rewrite_call(quantize_pattern(), quantize, func)
    func = relax.dpl.rewrite_call(dequantize_pattern(), dequantize, func)
    return _Retype().visit_expr(func)


@relax.expr_functor.mutator
class _Retype(relax.PyExprMutator):
    """Give every binding the type its value now has. ``rewrite_call`` keeps each var's old
    annotation, so a quantize turned uint8 stayed typed int8 and the kernels reading it
    were built for int8 data (the digits CNN's INT8 build for x86-vnni with int32-product
    convolutions: 13% top-1 instead of 98.7%)."""

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = self.visit_expr(binding.value)
        old = binding.var
        kind = relax.DataflowVar if isinstance(old, relax.DataflowVar) else relax.Var
        new = kind(old.name, value.ty)
        self.builder_.emit_normalized(relax.VarBinding(new, value))
        self.set_var_remap(old, new)


def _input(dq: relax.Call) -> tuple[relax.Expr, float, int, str] | None:
    """(integers, scale, zero point, dtype) of a per-tensor activation dequantize."""
    data, scale, zero = dq.args
    dtype = str(data.ty.dtype)
    if dtype not in QMIN or scalar(scale) is None or scalar(zero) is None:
        return None
    return data, float(scalar(scale)), int(scalar(zero)), dtype


def _output(q: relax.Call) -> tuple[float, int, str] | None:
    dtype = str(q.attrs.out_dtype)
    if dtype not in QMIN or scalar(q.args[1]) is None or scalar(q.args[2]) is None:
        return None
    return float(scalar(q.args[1])), int(scalar(q.args[2])), dtype


def _rescale(x, scale, zero, out_scale, out_zero, dtype, in_dtype) -> relax.Expr:
    """Integers at (scale, zero) -> integers at (out_scale, out_zero), exactly if equal."""
    if np.float32(scale) == np.float32(out_scale) and zero == out_zero and dtype == in_dtype:
        return x
    acc = relax.op.subtract(relax.op.astype(x, "int32"), relax.const(zero, "int32"))
    return requantize(acc, np.float64(scale) / out_scale, zero_point=out_zero,
                      bounds=(QMIN[dtype], QMAX[dtype]), dtype=dtype)


# ---------------------------------------------------------------------- conv / matmul


def _compute_rewriter(p: _Patterns, realized: list[str], quantized_output: bool,
                      kernels: _Kernels):
    def rewrite(call: relax.Call, m) -> relax.Expr:
        anchor = m.get(p.conv, m.get(p.matmul))
        source = _input(m[p.dq_x])
        output = _output(call) if quantized_output else (None, 0, "int32")
        if anchor is None or source is None or output is None:
            return call
        x, sx, zx, _ = source
        is_conv = p.conv in m
        weights = _weights(m, p, channel_axis=0 if is_conv else 1)
        if weights is None:
            return call
        w_int, w_scale = weights
        channels = w_int.shape[0] if is_conv else w_int.shape[1]
        acc_scale = np.float64(sx) * np.broadcast_to(w_scale.astype("float64"), (channels,))
        w_sum = (w_int.reshape(channels, -1).sum(axis=1) if is_conv
                 else w_int.sum(axis=0)).astype("int64")
        constant = -zx * w_sum
        if p.bias in m:
            bias = np.broadcast_to(const_value(m[p.bias]).reshape(-1), (channels,))
            constant = constant + np.round(bias / acc_scale).astype("int64")
        constant = np.clip(constant, -(2**31), 2**31 - 1).astype("int32")
        w_const = relax.const(w_int, "int8")
        # The zero point's dtype is the activation's (uint8 after _to_unsigned).
        x_dtype = str(m[p.dq_x].args[2].value.dtype)
        grouped = None
        packs = stores_packed(anchor)
        if packs and not fits_int4(w_int) and kernels.group_size:
            grouped = factor_groups(w_int, axis=0 if is_conv else 1,
                                    group_size=kernels.group_size)
        acc = None
        if (kernels.int4_tensor_cores and grouped is None and fits_int4(w_int)
                and _is_int4(m.get(p.x_narrow))):
            # W4A4 on s4 tensor cores: both operands packed, the product in the MMA.
            acc = (_int4_mma_conv(anchor, x, zx, w_int, kernels) if is_conv
                   else _int4_mma_matmul(x, w_int, kernels))
        if acc is None and packs and (fits_int4(w_int) or grouped is not None):
            # INT4 weights: stored two per byte, unpacked inside the kernel.
            acc = _int4_kernel(anchor, x, zx, x_dtype, w_int, kernels, grouped)
        if acc is None:
            acc = (_int_conv(anchor, x, zx, w_const) if is_conv
                   else relax.op.matmul(x, w_const, out_dtype="int32"))
        ndim = len(anchor.ty.shape)
        axis = 1 if is_conv else ndim - 1
        acc = relax.op.add(acc, relax.const(channel_shape(constant, ndim, axis), "int32"))
        realized.append(str(anchor.op.name).removeprefix("relax."))
        if not quantized_output:
            return relax.op.dequantize(
                acc, relax.const(acc_scale.astype("float32"), "float32"),
                relax.const(0, "int32"), axis=axis,
            )
        sy, zy, dtype = output
        act = m.get(p.relu, m.get(p.clip))
        return requantize(acc, acc_scale / sy, zero_point=zy,
                          bounds=activation_bounds(act, sy, zy, dtype), dtype=dtype, axis=axis,
                          ndim=ndim)

    return rewrite


def _weights(m, p: _Patterns, *, channel_axis: int):
    """Integer weights and their scale(s), from a weight dequantize or a folded constant."""
    if p.w_dq in m:
        dq = m[p.w_dq]
        if str(dq.args[0].ty.dtype) != "int8" or np.any(const_value(dq.args[2]) != 0):
            return None  # asymmetric weights: no int8 kernel
        return const_value(dq.args[0]), const_value(dq.args[1]).reshape(-1)
    weight = const_value(m[p.w_float])
    if weight.dtype != np.float32:
        return None
    # INT4 weights folded to float (q * scale) come back exactly at 4 bits: keep them int4.
    q4, s4 = quantize_weight(weight, axis=channel_axis, bits=4)
    shape = [1] * weight.ndim
    shape[channel_axis] = -1
    if np.allclose(q4 * s4.reshape(shape), weight, rtol=1e-6, atol=0):
        return q4, s4
    return quantize_weight(weight, axis=channel_axis, bits=8)


def _int4_kernel(anchor: relax.Call, x: relax.Expr, zero: int, x_dtype: str,
                 w_int: np.ndarray, kernels: _Kernels, grouped=None) -> relax.Expr:
    """``call_tir`` of one TE kernel: unpack the int4 weights (times their group multipliers
    when group-wise), then the integer conv/matmul: the blocked kernel of the CPU's default
    schedules (weights packed in its order: the same speed as INT8 but for the unpack) where
    it applies, else a generic integer conv/matmul."""
    x_shape = [int(d) for d in x.ty.shape]
    x_te = te.placeholder(x_shape, x_dtype, name="x")
    q, mult = grouped if grouped is not None else (w_int, None)
    m_te = te.placeholder(list(mult.shape), "uint8", name="w_mult") if mult is not None else None
    extra = {"mult": m_te, "group_size": kernels.group_size} if mult is not None else {}
    is_conv = anchor.op.name == "relax.nn.conv2d"
    quads = _quad_pointwise_int4(anchor, x, q, kernels) if is_conv else None
    if quads is not None:
        layout = quads[:2]
    else:
        layout = (_blocked_conv_int4(anchor, x, q, kernels) if is_conv
                  else _blocked_matmul_int4(x_dtype, q, kernels))
    # Blocked layouts pack in runs their kernels unpack a vector at a time.
    values = q if layout is None else layout[0]
    run = None if layout is None else int4_run(values.shape)
    packed = pack_int4(values) if run is None else pack_int4_runs(values, run)
    w_te = te.placeholder([packed.size], "uint8", name="w_packed")
    if is_conv:
        attrs = anchor.attrs
        top, left, bottom, right = (int(v) for v in attrs.padding)
        # Padding holds the zero point (the real 0), as in _int_conv.
        padded = topi.nn.pad(x_te, [0, 0, top, left], [0, 0, bottom, right], pad_value=zero) \
            if any((top, left, bottom, right)) else x_te
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        if quads is not None:
            weight = unpacked(w_te, layout[0].shape, m_te, layout[1], kernels.group_size, run)
            out = conv_to_gemm.pointwise_quads(x_te, weight, quads[2])
        elif layout is None:
            out = conv2d_int4(padded, w_te, weight_shape=w_int.shape, strides=strides,
                              padding=[0, 0, 0, 0], dilation=dilation,
                              groups=int(attrs.groups), **extra)
        else:
            weight = unpacked(w_te, layout[0].shape, m_te, layout[1], kernels.group_size, run)
            out = conv_blocked.conv2d_blocked(padded, weight, strides, (0, 0, 0, 0), dilation,
                                              "int32")
        name = "conv2d_int4"
    else:
        if layout is None:
            out = matmul_int4(x_te, w_te, weight_shape=w_int.shape, **extra)
        else:
            weight = unpacked(w_te, layout[0].shape, m_te, layout[1], kernels.group_size, run)
            out = matmul_blocked.matmul_blocked(x_te, weight, "int32", int(w_int.shape[1]))
        name = "matmul_int4"
    te_args = [x_te, w_te, *([m_te] if m_te is not None else []), out]
    gv = kernels.add(name, te.create_prim_func(te_args, index_dtype_override="int64"))
    out_ty = relax.TensorType([int(d) for d in out.shape], "int32")
    args = [x, relax.const(packed, "uint8")]
    if mult is not None:
        args.append(relax.const(mult, "uint8"))
    return relax.call_tir(gv, args, out_ty)


def _is_int4(clip: relax.Call | None) -> bool:
    """Whether an integer clamp keeps its values within int4, [-8, 7]."""
    if clip is None:
        return False
    lo, hi = clip_bounds(clip)
    return INT4_MIN <= lo and hi <= INT4_MAX


def _int4_mma_matmul(x: relax.Expr, w_int: np.ndarray, kernels: _Kernels) -> relax.Expr | None:
    """``x @ w_int`` for int4 values on both sides as the s4 tensor-core kernel
    (``_int4.int4_matmul``): x flattened to rows and packed at run time, the weight
    transposed (K-major) and packed here. None where the shapes do not fit its tiles
    (rows and columns multiples of 8, depth of 32)."""
    shape = [int(d) for d in x.ty.shape]
    *lead, depth = shape
    rows, cols = int(np.prod(lead)), int(w_int.shape[1])
    if rows % 8 or cols % 8 or depth % 32:
        return None
    x_te = te.placeholder(shape, "int8", name="x")
    packed_x = pack_int4_te(topi.reshape(x_te, [rows, depth]) if len(shape) != 2 else x_te)
    pack = kernels.add("pack_int4", te.create_prim_func([x_te, packed_x],
                                                        index_dtype_override="int64"))
    packed = relax.call_tir(pack, [x], relax.TensorType([rows, depth // 2], "int8"))
    a_te = te.placeholder([rows, depth // 2], "int8", name="a_packed")
    b_te = te.placeholder([cols, depth // 2], "int8", name="b_packed")
    gv = kernels.add("int4_matmul", te.create_prim_func(
        [a_te, b_te, int4_matmul(a_te, b_te)], index_dtype_override="int64"))
    weight = relax.const(pack_int4_rows(np.ascontiguousarray(w_int.T)), "int8")
    acc = relax.call_tir(gv, [packed, weight], relax.TensorType([rows, cols], "int32"))
    return relax.op.reshape(acc, [*lead, cols]) if len(shape) != 2 else acc


def _int4_mma_conv(conv: relax.Call, x: relax.Expr, zero: int, w_int: np.ndarray,
                   kernels: _Kernels) -> relax.Expr | None:
    """The int4 x int4 convolution on s4 tensor cores: each output pixel's receptive field
    gathered into a row and packed at run time (``_int4.patch_rows``), the OIHW weight
    flattened to rows of the same order and packed here, the product ``int4_matmul``
    ([pixels, out channels]) transposed back to NCHW. None for grouped layers and shapes
    off the tiles (pixels and output channels multiples of 8)."""
    attrs = conv.attrs
    if int(attrs.groups) != 1:
        return None
    shape = [int(d) for d in x.ty.shape]
    out_channels = int(w_int.shape[0])
    batch, _, oh, ow = (int(d) for d in conv.ty.shape)
    rows = batch * oh * ow
    window = int(np.prod(w_int.shape[1:]))
    depth = -(-window // 32) * 32
    if rows % 8 or out_channels % 8:
        return None
    x_te = te.placeholder(shape, "int8", name="x")
    packed_x = pack_int4_te(patch_rows(
        x_te, kernel=w_int.shape[2:], strides=[int(v) for v in attrs.strides],
        padding=[int(v) for v in attrs.padding], dilation=[int(v) for v in attrs.dilation],
        zero=zero, depth=depth))
    pack = kernels.add("pack_int4_patches", te.create_prim_func(
        [x_te, packed_x], index_dtype_override="int64"))
    packed = relax.call_tir(pack, [x], relax.TensorType([rows, depth // 2], "int8"))
    a_te = te.placeholder([rows, depth // 2], "int8", name="a_packed")
    b_te = te.placeholder([out_channels, depth // 2], "int8", name="b_packed")
    gv = kernels.add("int4_matmul", te.create_prim_func(
        [a_te, b_te, int4_matmul(a_te, b_te)], index_dtype_override="int64"))
    flat = np.zeros((out_channels, depth), "int8")
    flat[:, :window] = w_int.reshape(out_channels, window)
    weight = relax.const(pack_int4_rows(flat), "int8")
    acc = relax.call_tir(gv, [packed, weight], relax.TensorType([rows, out_channels], "int32"))
    pixels = relax.op.reshape(acc, [batch, oh, ow, out_channels])
    return relax.op.permute_dims(pixels, [0, 3, 1, 2])


def _quad_pointwise_int4(anchor: relax.Call, x: relax.Expr, q: np.ndarray, kernels: _Kernels):
    """(int4 weight in the quad pointwise kernel's layout, its origin map, the kernel's
    pixels), or None: the layers ``conv_algorithm.predict`` gives that kernel as INT8 (1x1
    uint8 on VNNI, image rows in whole vectors)."""
    conv = _conv2d(anchor, x, q)
    if predict(conv, kernels.weight_block, kernels.int_dot) is not ConvAlgorithm.GEMM:
        return None
    rows = conv_to_gemm.pointwise_quad_rows(conv, kernels.weight_block, kernels.int_dot)
    lanes = kernels.weight_block // 2
    weight = conv_to_gemm.quad_weight(q, rows)

    def origin(index):
        block, quad, row, lane = index
        return block * rows + row, quad * 4 + lane

    oh, ow = conv.output_hw
    return weight, origin, conv_to_gemm.whole_vectors(oh * ow, lanes)


def _conv2d(anchor: relax.Call, x: relax.Expr, q: np.ndarray) -> Conv2D:
    attrs = anchor.attrs
    return Conv2D(
        data=x, weight=q, strides=tuple(int(s) for s in attrs.strides),
        padding=tuple(int(p) for p in attrs.padding),
        dilation=tuple(int(d) for d in attrs.dilation), groups=int(attrs.groups),
        out_dtype="int32", data_shape=tuple(int(d) for d in x.ty.shape),
    )


def _blocked_conv_int4(anchor: relax.Call, x: relax.Expr, q: np.ndarray, kernels: _Kernels):
    """(int4 weight in the blocked conv's layout, its origin map), or None where the
    blocked kernel does not apply (no CPU block, grouped or depthwise layers)."""
    conv = _conv2d(anchor, x, q)
    if not conv_blocked.eligible(conv, kernels.weight_block):
        return None
    weight = conv_blocked.kernel_weight(conv, kernels.weight_block, kernels.int_dot)
    return weight, blocked_conv_origin(weight.shape)


def _blocked_matmul_int4(x_dtype: str, q: np.ndarray, kernels: _Kernels):
    """(int4 [K, N] weight in the blocked matmul's layout, its origin map), or None."""
    if kernels.weight_block is None or q.ndim != 2:
        return None
    # Columns padded to whole blocks if need be: the generic int4 matmul, its weights
    # unpacked one at a time, ran a 1280 x 1000 classifier at 0.45 ms (INT8: 0.04).
    weight = matmul_blocked.kernel_weight(q, kernels.weight_block,
                                          kernels.int_dot.for_data(x_dtype), pad=True)
    return None if weight is None else (weight, blocked_matmul_origin(weight.shape))


def _int_conv(conv: relax.Call, x: relax.Expr, zero: int, weight: relax.Expr) -> relax.Expr:
    """The integer conv; padding holds the zero point (the real 0), not integer 0."""
    attrs = conv.attrs
    padding = [int(v) for v in attrs.padding]
    if zero != 0 and any(padding):
        top, left, bottom, right = padding
        x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero))
        padding = [0, 0, 0, 0]
    return relax.op.nn.conv2d(
        x, weight, strides=attrs.strides, padding=padding, dilation=attrs.dilation,
        groups=attrs.groups, data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32",
    )


# ------------------------------------------------------------------------ add / concat


def _add_rewriter(p: _Patterns, realized: list[str]):
    def rewrite(call: relax.Call, m) -> relax.Expr:
        ins = [_input(m[p.dq_a]), _input(m[p.dq_b])]
        output = _output(call)
        if None in ins or output is None:
            return call
        sy, zy, dtype = output
        (a, sa, za, _), (b, sb, zb, _) = ins
        # One shift for both terms, so the sum rounds once.
        mult, shift = fixed_point(np.array([sa / sy, sb / sy]), common=True)
        terms = [
            relax.op.multiply(relax.op.subtract(relax.op.astype(v, "int64"), i64(z)), i64(k))
            for v, z, k in ((a, za, mult[0]), (b, zb, mult[1]))
        ]
        total = rounding_shift(relax.op.add(*terms), shift[0])
        act = m.get(p.add_relu, m.get(p.add_clip))
        realized.append("add")
        bounds = activation_bounds(act, sy, zy, dtype)
        return clamp_cast(relax.op.add(total, i64(zy)), *bounds, dtype)

    return rewrite


def _concat_rewriter(p: _Patterns, var2val, realized: list[str]):
    def rewrite(call: relax.Call, m) -> relax.Expr:
        output = _output(call)
        concat = m[p.concat_op]
        if output is None or not isinstance(concat.args[0], relax.Tuple):
            return call
        sy, zy, dtype = output
        fields = []
        for field in concat.args[0].fields:
            dq = _value(field, var2val)
            if not _is_op(dq, "relax.dequantize") or _input(dq) is None:
                return call
            x, sx, zx, in_dtype = _input(dq)
            fields.append(_rescale(x, sx, zx, sy, zy, dtype, in_dtype))
        realized.append("concat")
        return relax.op.concat(fields, axis=concat.attrs.axis)

    return rewrite


# ------------------------------------------------------------------ pools and moves


def _pool_rewriter(p: _Patterns, realized: list[str]):
    def rewrite(call: relax.Call, m) -> relax.Expr:
        output = _output(call)
        name = next((n for n, pattern in p.pool_ops.items() if pattern in m), None)
        if name is None or output is None:
            return call
        op = m[p.pool_ops[name]]
        source = _input(m[p.dq_in])
        if source is None:
            return call
        x, sx, zx, in_dtype = source
        sy, zy, dtype = output
        if name == "relax.nn.max_pool2d" or name in _MOVE_OPS:
            moved = relax.Call(op.op, [x, *op.args[1:]], op.attrs, op.ty_args)
            if name == "relax.nn.max_pool2d" and str(op.attrs.layout) != "NCHW":
                return call
            realized.append(name.removeprefix("relax."))
            return _rescale(moved, sx, zx, sy, zy, dtype, in_dtype)
        summed, count = _int_sum(name, op, x, zx)
        if summed is None:
            return call
        realized.append(name.removeprefix("relax."))
        return requantize(summed, np.float64(sx) / (np.float64(sy) * count), zero_point=zy,
                          bounds=(QMIN[dtype], QMAX[dtype]), dtype=dtype)

    return rewrite


def _int_sum(name: str, op: relax.Call, x: relax.Expr, zero: int):
    """(sum of x - zero over each window as int32, window size) of an average."""
    shape = [int(d) for d in op.args[0].ty.shape]
    if name == "relax.mean":
        axes = [int(a) % len(shape) for a in op.attrs.axis] if op.attrs.axis else list(
            range(len(shape))
        )
        count = int(np.prod([shape[a] for a in axes]))
        total = relax.op.sum(relax.op.astype(x, "int32"), axis=axes, keepdims=op.attrs.keepdims)
    elif name == "relax.nn.adaptive_avg_pool2d":
        if op.attrs.output_size is not None and any(int(v) != 1 for v in op.attrs.output_size):
            return None, 0
        count = shape[2] * shape[3]
        total = relax.op.sum(relax.op.astype(x, "int32"), axis=[2, 3], keepdims=True)
    else:  # avg_pool2d as a depthwise conv with a kernel of ones: exact window sums
        attrs = op.attrs
        padded = any(int(v) for v in attrs.padding)
        if attrs.ceil_mode or (padded and not attrs.count_include_pad) or attrs.layout != "NCHW":
            return None, 0
        kh, kw = (int(v) for v in attrs.pool_size)
        count = kh * kw
        channels = shape[1]
        ones = relax.const(np.ones((channels, 1, kh, kw), "int8"), "int8")
        top, left, bottom, right = (int(v) for v in attrs.padding)
        if any((top, left, bottom, right)):
            x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right],
                                pad_value=float(zero))
        total = relax.op.nn.conv2d(x, ones, strides=attrs.strides, dilation=attrs.dilation,
                                   groups=channels, out_dtype="int32")
    return relax.op.subtract(total, relax.const(count * zero, "int32")), count


def _value(expr: relax.Expr, var2val) -> relax.Expr:
    return var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr


def _is_op(expr: relax.Expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == name
