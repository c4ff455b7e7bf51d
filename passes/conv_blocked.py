"""The direct convolution with its weights blocked by output channel, for CPUs.

``out[n, oc, y, x] = sum over (ic, ky, kx) of data[n, ic, y*s + ky, x*s + kx] * w[oc, ic, ky, kx]``
with the weight stored as ``[OC / B, IC, KH, KW, B]`` (a constant computed here), B a small
multiple of the vector width. The kernel keeps a register tile of a few output pixels by
B output channels: each step of the reduction loads B consecutive weights as vectors and
broadcasts one input value per pixel, so every load feeds several fused multiply-adds and
the weights stream in order from cache. Data and output stay NCHW: the bias, activation
and residual add (or a quantized layer's requantize) after the convolution fuse into the
kernel, and the graph needs no layout transforms. ``schedules/cpu_conv.py`` schedules the
kernel, found by its block's ``tvmq.kernel`` attribute.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvmq.schedules.kernel_layouts import CONV_BLOCKED as KERNEL_NAME
from tvmq.schedules.kernel_layouts import CONV_DEPTHWISE as DEPTHWISE_NAME
from tvmq.schedules.kernel_layouts import DEPTHWISE_PAD

from ._conv import KERNEL_ATTR, Conv2D, IntDot

# (data, output) dtypes the kernel computes: float32, and the int8/uint8 x int8 -> int32
# convolutions of quantized layers (products and sums in int32, exact).
_DTYPES = {("float32", "float32"), ("int8", "int32"), ("uint8", "int32")}


def eligible(conv: Conv2D, block: int | None) -> bool:
    """Ungrouped convolutions of a supported dtype whose output channels split into blocks."""
    return (
        block is not None
        and conv.groups == 1
        and (str(conv.data.ty.dtype), conv.out_dtype) in _DTYPES
        and weight_block(conv, block) is not None
    )


def depthwise(conv: Conv2D, block: int | None) -> bool:
    """One filter per channel (groups = input channels = output channels), on a CPU
    (``block``, the target's weight block, is None elsewhere), of a dtype the kernel
    computes."""
    out_channels, per_group = conv.weight.shape[:2]
    return (
        block is not None
        and per_group == 1
        and conv.groups == out_channels == conv.data_shape[1]
        and (str(conv.data.ty.dtype), conv.out_dtype) in _DTYPES
    )


def emit_depthwise(builder: relax.BlockBuilder, conv: Conv2D, block: int) -> relax.Expr:
    """The depthwise kernel for ``conv`` (weights stay [C, 1, KH, KW]), its vectors half
    the weight ``block`` wide."""
    return builder.call_te(
        conv2d_depthwise, conv.data, relax.const(conv.weight), conv.strides, conv.padding,
        conv.dilation, conv.out_dtype, max(block // 2, 1), primfunc_name_hint=DEPTHWISE_NAME,
    )


def conv2d_depthwise(data, weight, strides, padding, dilation, out_dtype: str, lanes: int):
    """out[n, c, y, x] = sum over the window of data[n, c, ...] * weight[c, 0, ...], computed
    on each channel's image flattened, so that every tap of the window is one contiguous
    run of input for a contiguous run of outputs, whatever the width, stride or dilation.

    The padded input is split by stride phase: ``plane[n, c, py, px, i, j]`` (rows ``wq``
    wide) holds padded row ``i * sh + py``, column ``j * sw + px``. Output (y, x) sits at
    ``p = y * wq + x`` of a row-major image ``wq`` columns wide, and tap (ky, kx) reads the
    plane's flat element ``p + (ky*dh // sh) * wq + kx*dw // sw`` of phase
    ``((ky*dh) % sh, (kx*dw) % sw)`` (past a row's end, the next row's start): a vector of
    outputs takes one vector load and one multiply-add per tap. The columns past the image
    (and rows, to make the image whole vectors) are computed and dropped.

    Strided layers pad the image first and copy the phases from it unchecked (see
    ``schedules/cpu_conv.py``: MobileNetV2's stride-2 layers 2-2.7x faster than with the
    bound check in the phase copy). Measured on MobileNetV2's 3x3 layers (AVX-512, 2
    threads), against the kernel before it (vectorized along each output row, strided
    loads; TVM's for rows under two vectors):
    96x112x112 stride 2 0.27 ms against 0.48, 144x56x56 0.12 against 0.16, 192x28x28 0.032
    against 0.185, 960x7x7 0.024 against 0.032; the model's depthwise layers 0.94 ms
    against 1.70 in all.
    """
    batch, channels, height, width = (int(d) for d in data.shape)
    _, _, kh, kw = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    tall, wq = _flat_extent(oh, ow + (kw - 1) * dw // sw, lanes)
    # Rows of plane any output reads: the last output row's plus the window's reach.
    rows = tall + (kh - 1) * dh // sh + 1
    zero = tvm.tirx.const(0, data.dtype)

    def padded_value(n, c, y, x):
        inside = tvm.tirx.all(y >= top, y < height + top, x >= left, x < width + left)
        return tvm.tirx.if_then_else(inside, data[n, c, y - top, x - left], zero)

    if (sh, sw) == (1, 1):
        def plane_value(n, c, py, px, i, j):
            return padded_value(n, c, i, j)
    else:
        # Strided: the padded image first (contiguous rows, vectorized), then each phase
        # read from it without a bound check: a check on every strided read kept the copy
        # scalar with a branch per value (96x112x112 stride 2: 0.43-0.59 ms, mostly the
        # copy, against 0.13 for the 144x56x56 stride-1 layer's whole kernel).
        columns = -(-wq * sw // lanes) * lanes
        padded = te.compute((batch, channels, rows * sh, columns), padded_value,
                            name=DEPTHWISE_PAD)

        def plane_value(n, c, py, px, i, j):
            return padded[n, c, i * sh + py, j * sw + px]

    # Rows of ``wq`` (the output's flattened width): a tap past a row's end reads the next
    # row's start, so the kernel reads whole rows (no partial last row to copy).
    plane = te.compute((batch, channels, sh, sw, rows, wq), plane_value, name="data_plane")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def tap(n, c, y, x, ry, rx):
        column = x + rx * dw // sw
        return plane[n, c, ry * dh % sh, rx * dw % sw, y + ry * dh // sh + column // wq,
                     column % wq]

    out = te.compute(
        (batch, channels, tall, wq),
        lambda n, c, y, x: te.sum(
            tap(n, c, y, x, ry, rx).astype(out_dtype) * weight[c, 0, ry, rx].astype(out_dtype),
            axis=[ry, rx],
        ),
        name=DEPTHWISE_NAME,
        attrs={KERNEL_ATTR: DEPTHWISE_NAME},
    )
    return te.compute((batch, channels, oh, ow), lambda n, c, y, x: out[n, c, y, x],
                      name="crop")


def _flat_extent(oh: int, columns: int, lanes: int) -> tuple[int, int]:
    """(rows, width) of the smallest image at least ``oh`` x ``columns`` whose size is a
    multiple of ``lanes`` (its flattened pixels split into whole vectors)."""
    best = None
    for width in range(columns, columns + lanes):
        for rows in range(oh, oh + lanes):
            if rows * width % lanes == 0 and (best is None or rows * width < best[0] * best[1]):
                best = (rows, width)
    return best


def weight_block(conv: Conv2D, block: int) -> int | None:
    """The channel block for ``conv``: ``block``, or half of it when that divides instead."""
    out_channels = conv.weight.shape[0]
    for size in (block, block // 2):
        if size >= 1 and out_channels % size == 0:
            return size
    return None


def blocked_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """OIHW -> [O / block, I, KH, KW, block]."""
    out_channels, in_channels, kh, kw = weight.shape
    grouped = weight.reshape(out_channels // block, block, in_channels, kh, kw)
    return np.ascontiguousarray(grouped.transpose(0, 2, 3, 4, 1))


def grouped_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """[O/B, I, KH, KW, B] -> [O/B, ceil(I/g), KH, KW, B, g]: each weight beside its next
    ``g - 1`` input-channel neighbours (zeros past the last channel), the operand layout of
    ``vpmaddwd`` (g = 2) and ``vpdpbusd`` (g = 4)."""
    blocks, channels, kh, kw, size = weight.shape
    padded = -channels % group
    if padded:
        weight = np.pad(weight, ((0, 0), (0, padded), (0, 0), (0, 0), (0, 0)))
    grouped = weight.reshape(blocks, (channels + padded) // group, group, kh, kw, size)
    return np.ascontiguousarray(grouped.transpose(0, 1, 3, 4, 5, 2))


def emit_blocked(
    builder: relax.BlockBuilder, conv: Conv2D, block: int, int_dot: IntDot = IntDot.WIDE
) -> relax.Expr:
    """The blocked direct form of ``conv`` (its kernel added to ``builder``).

    ``int_dot``: the target's integer multiply (passes/_conv.py ``IntDot``); integer
    convolutions take its grouped-channel form, which ``schedules/int8_dot.py`` computes
    with ``vpmaddwd`` (int16 pairs, AVX2) or ``vpdpbusd`` (uint8 quads, AVX-512 VNNI).
    """
    return builder.call_te(
        conv2d_blocked, conv.data, relax.const(kernel_weight(conv, block, int_dot)),
        conv.strides, conv.padding, conv.dilation, conv.out_dtype, primfunc_name_hint=KERNEL_NAME,
    )


def kernel_weight(conv: Conv2D, block: int, int_dot: IntDot = IntDot.WIDE) -> np.ndarray:
    """``conv``'s weight as the blocked kernel reads it: blocked by output channel and, for
    an integer convolution, in ``int_dot``'s grouped form for its activations."""
    form = int_dot.for_data(str(conv.data.ty.dtype)) if conv.is_integer else IntDot.WIDE
    weight = blocked_weight(conv.weight, weight_block(conv, block))
    return weight if form is IntDot.WIDE else grouped_weight(weight, form.group)


def conv2d_blocked(data, weight, strides, padding, dilation, out_dtype: str):
    """The kernel; a 6-d weight ([O/B, I/g, KH, KW, B, g]) selects the grouped-channel form
    (g = 2: int16 pairs; g = 4: uint8 quads)."""
    batch, _, height, width = (int(d) for d in data.shape)
    group = int(weight.shape[5]) if len(weight.shape) == 6 else 1
    blocks, in_channels, kh, kw, block = (int(d) for d in weight.shape[:5])
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    # Odd output sizes are computed one row / column larger (the input padded to match) and
    # cropped: a 2x2 pixel tile then fits, where 7x7 or 13x13 outputs only fit 1x7 or 1x1
    # tiles, and a tile that does not divide the image puts a branch in the inner loop.
    # Measured (AVX2, 2 threads): 13x13x256 3x3 44 GFLOP/s as 1x1 tiles, ~125 as 2x2 tiles.
    # Not for 1x1 kernels: ResNet-50's 1x1 stride-2 layer to 7x7 ran 3.9 ms as 1x7 tiles,
    # 5.5 ms computed 8x8 (the input copy and 30% more work outweigh the better tile).
    tall, wide = (_even(oh), _even(ow)) if kh * kw > 1 else (oh, ow)
    bottom += (tall - oh) * sh
    right += (wide - ow) * sw
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    ic = te.reduce_axis((0, in_channels), name="ic")
    if group > 1:
        # The padding copy also interleaves channel groups (widened to int16 for pairs), so
        # the kernel broadcasts each group with one 32-bit load.
        wide_dtype = "int16" if group == 2 else str(data.dtype)
        padded = _pad_groups(data, group, wide_dtype, top, left, bottom, right)
        lane = te.reduce_axis((0, group), name="lane")

        def value(n, oc, y, x):
            return te.sum(
                padded[n, ic, y * sh + ry * dh, x * sw + rx * dw, lane].astype(out_dtype)
                * weight[oc // block, ic, ry, rx, oc % block, lane].astype(out_dtype),
                axis=[ic, ry, rx, lane],
            )
    else:
        padded = (
            topi.nn.pad(data, (0, 0, top, left), (0, 0, bottom, right), name="data_pad")
            if any((top, left, bottom, right)) else data
        )

        def value(n, oc, y, x):
            return te.sum(
                padded[n, ic, y * sh + ry * dh, x * sw + rx * dw].astype(out_dtype)
                * weight[oc // block, ic, ry, rx, oc % block].astype(out_dtype),
                axis=[ic, ry, rx],
            )

    out = te.compute((batch, blocks * block, tall, wide), value, name=KERNEL_NAME,
                     attrs={KERNEL_ATTR: KERNEL_NAME})
    if (tall, wide) == (oh, ow):
        return out
    return te.compute((batch, blocks * block, oh, ow), lambda *i: out(*i), name="crop")


def _pad_groups(data, group: int, dtype: str, top: int, left: int, bottom: int, right: int):
    """[N, C, H, W] -> zero-padded [N, ceil(C/g), H', W', g] of ``dtype`` (channels past C
    are zero, as are their weights)."""
    batch, channels, height, width = (int(d) for d in data.shape)

    def value(n, c, y, x, i):
        inside = tvm.tirx.all(
            y >= top, y < top + height, x >= left, x < left + width, group * c + i < channels
        )
        return tvm.tirx.if_then_else(
            inside, data[n, group * c + i, y - top, x - left].astype(dtype),
            tvm.tirx.const(0, dtype),
        )

    shape = (batch, -(-channels // group), height + top + bottom, width + left + right, group)
    return te.compute(shape, value, name="data_groups")


def _even(extent: int) -> int:
    return extent + 1 if extent > 1 and extent % 2 else extent
