"""What the convolution rewrites share: reading a conv2d call and its constant weight."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import tvm
from tvm import relax
from tvmq.schedules.kernel_layouts import KERNEL_ATTR  # noqa: F401 (the passes' import)


class IntDot(StrEnum):
    """The instruction an integer kernel's operands are laid out for (CPUs).

    - ``int32``: each int8 product widened to int32 (any CPU);
    - ``int16-pairs``: ``vpmaddwd`` (AVX2): activations widened to int16, two input
      channels per 32-bit lane, weights [..., B, 2];
    - ``u8-quads``: ``vpdpbusd`` (AVX-512 VNNI): uint8 activations times int8 weights, four
      input channels per 32-bit lane, weights [..., B, 4]. VNNI multiplies u8 by s8 only,
      so int8 activations fall back to pairs.
    - ``s8-quads``: ``sdot`` (AArch64 dot product): int8 activations times int8 weights,
      four input channels per 32-bit lane, weights [..., B, 4].
    """

    WIDE = "int32"
    PAIRS = "int16-pairs"
    QUADS = "u8-quads"
    SIGNED_QUADS = "s8-quads"

    def for_data(self, dtype: str) -> IntDot:
        """The form a kernel with ``dtype`` activations takes under this target form."""
        if self is IntDot.QUADS and dtype != "uint8":
            return IntDot.PAIRS
        if self is IntDot.SIGNED_QUADS and dtype != "int8":
            return IntDot.WIDE
        return self

    def dividing(self, depth: int) -> IntDot:
        """The widest form, at most this one, whose groups split ``depth`` channels (for
        kernels that read their activations in place and so cannot pad them)."""
        return next(f for f in self._narrower if depth % f.group == 0)

    @property
    def _narrower(self) -> tuple[IntDot, ...]:
        """This form and the ones the same target falls back to, widest first."""
        return {
            IntDot.QUADS: (IntDot.QUADS, IntDot.PAIRS, IntDot.WIDE),
            IntDot.SIGNED_QUADS: (IntDot.SIGNED_QUADS, IntDot.WIDE),
            IntDot.PAIRS: (IntDot.PAIRS, IntDot.WIDE),
            IntDot.WIDE: (IntDot.WIDE,),
        }[self]

    @property
    def group(self) -> int:
        """Input channels multiplied into each 32-bit accumulator lane per instruction."""
        return {IntDot.WIDE: 1, IntDot.PAIRS: 2, IntDot.QUADS: 4, IntDot.SIGNED_QUADS: 4}[self]


@dataclass(frozen=True)
class Conv2D:
    """An NCHW/OIHW conv2d whose weight is a constant (float, or integer when read so)."""

    data: relax.Expr
    weight: np.ndarray
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    out_dtype: str
    data_shape: tuple[int, ...]

    @property
    def is_integer(self) -> bool:
        return not str(self.data.ty.dtype).startswith("float")

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def output_hw(self) -> tuple[int, int]:
        (_, _, h, w), (kh, kw) = self.data_shape, self.kernel
        top, left, bottom, right = self.padding
        oh = (h + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.strides[0] + 1
        ow = (w + left + right - self.dilation[1] * (kw - 1) - 1) // self.strides[1] + 1
        return oh, ow


_INTEGER_DATA = ("int8", "uint8")


def read_conv2d(
    call: relax.Call, constants: dict | None = None, *, integer: bool = False
) -> Conv2D | None:
    """The conv2d a call computes, if it is a float NCHW conv2d with a constant weight (or,
    with ``integer``, also an int8/uint8 x int8 -> int32 one, as RealizeQuantization emits)."""
    if not isinstance(call, relax.Call) or getattr(call.op, "name", None) != "relax.nn.conv2d":
        return None
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    data, weight = call.args
    if isinstance(weight, relax.Var) and constants is not None:
        weight = constants.get(weight, weight)
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    data_ty = data.ty
    if not isinstance(data_ty, relax.TensorType):
        return None
    integral = integer and data_ty.dtype in _INTEGER_DATA and weight.value.dtype == "int8"
    if data_ty.dtype not in ("float32", "float16") and not integral:
        return None
    try:
        shape = tuple(int(d) for d in data_ty.shape.values)
    except (TypeError, AttributeError):
        return None
    out_dtype = str(attrs.out_dtype)
    if attrs.out_dtype is None or out_dtype in ("", "void", "None"):
        out_dtype = str(data_ty.dtype)
    return Conv2D(
        data=data,
        weight=weight.value.numpy(),
        strides=tuple(int(s) for s in attrs.strides),
        padding=tuple(int(p) for p in attrs.padding),
        dilation=tuple(int(d) for d in attrs.dilation),
        groups=int(attrs.groups),
        out_dtype=out_dtype,
        data_shape=shape,
    )
