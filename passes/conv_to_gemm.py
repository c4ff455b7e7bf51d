"""ConvToGemm: convolutions as matrix multiplies (1x1 directly, k x k through im2col).

Runs on the graph before LegalizeOps, after batch-norm folding. A 1x1 stride-1 unpadded
convolution is a matmul of the weight [OC, IC] with the input viewed as [N, IC, H*W]; any
other convolution first gathers its patches into columns [N, IC*KH*KW, OH, OW] (im2col),
the input of a 1x1 convolution, so the multiply reads both operands contiguously whatever
the stride. The reshaped weight is a constant computed here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te
from tvmq.schedules.kernel_layouts import CONV_POINTWISE as POINTWISE_NAME
from tvmq.schedules.kernel_layouts import CONV_POINTWISE_QUADS as POINTWISE_QUADS_NAME
from tvmq.schedules.kernel_layouts import (
    pointwise_image_rows,
    pointwise_vectors,
    quad_tile_pixels,
    whole_vectors,
)

from ._conv import KERNEL_ATTR, Conv2D, IntDot
from .winograd import rewrite_convolutions


def eligible(conv: Conv2D) -> bool:
    return conv.groups == 1


def emit_gemm(
    builder: relax.BlockBuilder, conv: Conv2D, weight_block: int | None = None,
    int_dot: IntDot = IntDot.WIDE,
) -> relax.Expr:
    """The matmul form of ``conv`` (im2col kernel, if needed, added to ``builder``).

    On CPUs (``weight_block`` given), a float32 layer whose output rows fill vectors takes
    the row-blocked kernel (``pointwise_blocked``; k x k layers over their patches, gathered
    in the kernel's prologue) instead of the generic one, and a pointwise uint8 layer on a
    VNNI target its quad form (``pointwise_quads``).
    """
    out_channels, in_channels, kh, kw = conv.weight.shape
    oh, ow = conv.output_hw
    pointwise = (kh, kw) == (1, 1) and conv.strides == (1, 1) and not any(conv.padding)
    quad_rows = pointwise_quad_rows(conv, weight_block, int_dot)
    if quad_rows is not None:
        return builder.call_te(pointwise_quads, conv.data,
                               relax.const(quad_weight(conv.weight, quad_rows)),
                               whole_vectors(oh * ow, weight_block // 2),
                               primfunc_name_hint=POINTWISE_QUADS_NAME)
    depth = in_channels * kh * kw
    window = conv.kernel, conv.strides, conv.padding, conv.dilation
    rows = pointwise_rows(conv, weight_block)
    if rows is not None:
        # The pointwise kernel over the image's patches: im2col runs inside the kernel as
        # its prologue (a copy of the input per tap), then the same row-blocked GEMM.
        blocked = conv.weight.reshape(out_channels // rows, rows, depth)
        weight = relax.const(np.ascontiguousarray(blocked.transpose(0, 2, 1)))
        if pointwise:
            return builder.call_te(pointwise_blocked, conv.data, weight,
                                   primfunc_name_hint=POINTWISE_NAME)
        return builder.call_te(
            lambda data, w: pointwise_blocked(im2col(data, *window), w), conv.data, weight,
            primfunc_name_hint=POINTWISE_NAME)
    weight = relax.const(conv.weight.reshape(out_channels, depth))
    if pointwise:
        columns = conv.data
    else:
        columns = builder.emit(
            builder.call_te(im2col, conv.data, *window, primfunc_name_hint="im2col"))
    return builder.call_te(gemm, weight, columns, conv.out_dtype,
                           primfunc_name_hint="conv2d_gemm")


def pointwise_rows(conv: Conv2D, weight_block: int | None) -> int | None:
    """Output channels per register tile of the row-blocked pointwise kernel, or None.

    The tile is ``rows`` channels (each weight broadcast) by one or two vectors of the
    image's pixels (contiguous runs of whole image rows, ``pointwise_image_rows``).
    """
    if conv.out_dtype != "float32" or conv.is_integer:
        return None
    return _tile_rows(conv, weight_block)


def pointwise_quad_rows(conv: Conv2D, weight_block: int | None, int_dot: IntDot) -> int | None:
    """Output channels per register tile of the quad pointwise kernel (``pointwise_quads``),
    or None: 1x1 stride-1 unpadded uint8 layers on a ``vpdpbusd`` target (16 int32 lanes).
    Images that do not split into whole vectors (14x14, 7x7) are computed padded to them."""
    pointwise = conv.kernel == (1, 1) and conv.strides == (1, 1) and not any(conv.padding)
    if (not pointwise or conv.groups != 1 or not conv.is_integer or conv.out_dtype != "int32"
            or int_dot.for_data(str(conv.data.ty.dtype)) is not IntDot.QUADS
            or weight_block != 32):
        return None
    return _tile_rows(conv, weight_block, quad_tile_pixels(*conv.output_hw, weight_block // 2))


def _tile_rows(conv: Conv2D, weight_block: int | None, pixels: int | None = None) -> int | None:
    if weight_block is None:
        return None
    lanes = weight_block // 2
    if pixels is None:
        height, width = conv.output_hw
        image_rows = pointwise_image_rows(height, width, lanes)
        if image_rows is None:
            return None
        pixels = image_rows * width
    vectors = pointwise_vectors(pixels, lanes)
    # Accumulators: all vector registers but the pixel vectors, a broadcast and a spare
    # (AVX2 has 16 registers; AVX-512 and NEON 32).
    registers = 16 if lanes == 8 else 32
    most = (registers - 4) // vectors
    out_channels = conv.weight.shape[0]
    rows = max((r for r in range(2, most + 1) if out_channels % r == 0), default=None)
    return rows


def pointwise_blocked(data, weight):
    """out[n, oc, y, x] = sum_k weight[oc // R, k, oc % R] * data[n, k, y, x]: a 1x1
    convolution as a matmul over the image, weights [OC / R, IC, R]."""
    batch, channels, height, width = (int(d) for d in data.shape)
    blocks, _, rows = (int(d) for d in weight.shape)
    k = te.reduce_axis((0, channels), name="k")
    return te.compute(
        (batch, blocks * rows, height, width),
        lambda n, oc, y, x: te.sum(data[n, k, y, x] * weight[oc // rows, k, oc % rows], axis=k),
        name=POINTWISE_NAME,
        attrs={KERNEL_ATTR: POINTWISE_NAME},
    )




def quad_weight(weight: np.ndarray, rows: int) -> np.ndarray:
    """OIHW (1x1) int8 -> [O / rows, ceil(I / 4), rows, 4]: each output channel's weights in
    quads of input channels (zeros past the last), ``rows`` channels per block."""
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels, in_channels)
    flat = np.pad(flat, ((0, 0), (0, -in_channels % 4)))
    quads = flat.reshape(out_channels // rows, rows, -1, 4)
    return np.ascontiguousarray(quads.transpose(0, 2, 1, 3))


def pointwise_quads(data, weight, pixels: int):
    """out[n, oc, y, x] = sum_k data[n, k, y, x] * w[oc, k] for uint8 data and int8 weights
    ([OC / R, K / 4, R, 4], ``quad_weight``), in int32, over the image flattened and padded
    to ``pixels`` (whole vectors; the padding is computed on zeros and dropped).

    The ``vpdpbusd`` form of the pointwise kernel: the input is copied to quads of channels
    per pixel (``quads[n, k, p, i]`` = channel 4k + i of flattened pixel p), so 16 pixels'
    quads are one 64-byte vector; each instruction multiplies them by one output channel's
    broadcast quad of weights into 16 int32 pixels of that channel, contiguous in NCHW like
    the float kernel's (``schedules/cpu_conv.py`` ``PointwiseConv``). The blocked direct
    kernel puts output channels in the lanes instead, and then writes NCHW by transposing.
    """
    batch, channels, height, width = (int(d) for d in data.shape)
    blocks, groups, rows, _ = (int(d) for d in weight.shape)
    zero = tvm.tirx.const(0, data.dtype)

    def quad(n, k, p, i):
        c = 4 * k + i
        inside = [c < channels] if channels % 4 else []
        inside += [p < height * width] if pixels > height * width else []
        if not inside:
            return data[n, c, p // width, p % width]
        value = data[n, tvm.tirx.min(c, channels - 1), tvm.tirx.min(p // width, height - 1),
                     p % width]
        return tvm.tirx.if_then_else(tvm.tirx.all(*inside), value, zero)

    quads = te.compute((batch, groups, pixels, 4), quad, name="data_quads")
    k = te.reduce_axis((0, groups), name="k")
    i = te.reduce_axis((0, 4), name="i")
    flat = te.compute(
        (batch, blocks * rows, pixels),
        lambda n, oc, p: te.sum(
            quads[n, k, p, i].astype("int32") * weight[oc // rows, k, oc % rows, i].astype("int32"),
            axis=[k, i],
        ),
        name=POINTWISE_QUADS_NAME,
        attrs={KERNEL_ATTR: POINTWISE_QUADS_NAME},
    )
    return te.compute((batch, blocks * rows, height, width),
                      lambda n, oc, y, x: flat[n, oc, y * width + x], name="unflatten")


def gemm(weight, columns, out_dtype: str):
    """out[n, oc, y, x] = sum_k weight[oc, k] * columns[n, k, y, x].

    Written straight into NCHW so the bias and activation after it fuse into the kernel.
    """
    batch, depth, oh, ow = (int(d) for d in columns.shape)
    k = te.reduce_axis((0, depth), name="k")
    return te.compute(
        (batch, int(weight.shape[0]), oh, ow),
        lambda n, oc, y, x: te.sum(
            weight[oc, k].astype(out_dtype) * columns[n, k, y, x].astype(out_dtype), axis=k
        ),
        name="conv2d_gemm",
    )


def im2col(data, kernel, strides, padding, dilation, pad_value=0.0):
    """columns[n, (ci, kh, kw), y, x] = the padded input (``pad_value`` outside the image)
    under output (y, x)'s window: the input of a 1x1 convolution with IC * KH * KW
    channels."""
    from tvm import topi

    batch, channels, height, width = (int(d) for d in data.shape)
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    top, left, bottom, right = padding
    oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    padded = topi.nn.pad(data, (0, 0, top, left), (0, 0, bottom, right), pad_value,
                         name="data_pad")

    def column(n, k, y, x):
        ci, r = k // (kh * kw), k % (kh * kw)
        return padded[n, ci, y * sh + (r // kw) * dh, x * sw + (r % kw) * dw]

    return te.compute((batch, channels * kh * kw, oh, ow), column, name="im2col")


@tvm.transform.module_pass(opt_level=0, name="ConvToGemm")
class ConvToGemm:
    """Rewrite conv2d calls as matmuls.

    Parameters
    ----------
    select : callable, optional
        ``select(conv, binding_name) -> bool``: which convolutions to rewrite (default:
        all ungrouped ones). The per-layer algorithm choice passes its decision here.
    """

    def __init__(self, select: Callable[[Conv2D, str], bool] | None = None):
        self.select = select

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        select = self.select

        def rewrite(builder, conv, name):
            if not eligible(conv) or (select is not None and not select(conv, name)):
                return None
            return emit_gemm(builder, conv)

        return rewrite_convolutions(mod, rewrite)
