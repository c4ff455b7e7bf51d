"""ConvToGemm: convolutions as matrix multiplies (1x1 directly, k x k through im2col).

Runs on the graph before LegalizeOps, after batch-norm folding. A 1x1 stride-1 unpadded
convolution is a matmul of the weight [OC, IC] with the input viewed as [N, IC, H*W]; any
other convolution first gathers its patches into columns [N, IC*KH*KW, OH*OW] (im2col), so
the multiply reads both operands contiguously whatever the stride. The reshaped weight is
a constant computed here.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, te

from ._conv import Conv2D
from .winograd import rewrite_convolutions


def eligible(conv: Conv2D) -> bool:
    return conv.groups == 1


def emit_gemm(builder: relax.BlockBuilder, conv: Conv2D) -> relax.Expr:
    """The matmul form of ``conv`` (im2col kernel, if needed, added to ``builder``)."""
    out_channels, in_channels, kh, kw = conv.weight.shape
    batch = conv.data_shape[0]
    oh, ow = conv.output_hw
    weight = relax.const(conv.weight.reshape(out_channels, in_channels * kh * kw))
    pointwise = (kh, kw) == (1, 1) and conv.strides == (1, 1) and not any(conv.padding)
    if pointwise:
        columns = builder.emit(relax.op.reshape(conv.data, (batch, in_channels, oh * ow)))
    else:
        columns = builder.emit(
            builder.call_te(im2col, conv.data, conv.kernel, conv.strides, conv.padding,
                            conv.dilation, primfunc_name_hint="im2col")
        )
    return builder.call_te(gemm, weight, columns, (oh, ow), conv.out_dtype,
                           primfunc_name_hint="conv2d_gemm")


def gemm(weight, columns, output_hw, out_dtype: str):
    """out[n, oc, y, x] = sum_k weight[oc, k] * columns[n, k, y * OW + x].

    Written straight into NCHW so the bias and activation after it fuse into the kernel.
    """
    batch, depth = int(columns.shape[0]), int(columns.shape[1])
    oh, ow = output_hw
    k = te.reduce_axis((0, depth), name="k")
    return te.compute(
        (batch, int(weight.shape[0]), oh, ow),
        lambda n, oc, y, x: te.sum(
            weight[oc, k].astype(out_dtype) * columns[n, k, y * ow + x].astype(out_dtype), axis=k
        ),
        name="conv2d_gemm",
    )


def im2col(data, kernel, strides, padding, dilation):
    """columns[n, (ci, kh, kw), (oh, ow)] = padded data under each output's window."""
    from tvm import topi

    batch, channels, height, width = (int(d) for d in data.shape)
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    top, left, bottom, right = padding
    oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    padded = topi.nn.pad(data, (0, 0, top, left), (0, 0, bottom, right), name="data_pad")

    def column(n, k, p):
        ci, r = k // (kh * kw), k % (kh * kw)
        y, x = p // ow, p % ow
        return padded[n, ci, y * sh + (r // kw) * dh, x * sw + (r % kw) * dw]

    return te.compute((batch, channels * kh * kw, oh * ow), column, name="im2col")


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
