"""INT4 weights: two per byte in the artifact, unpacked inside the integer kernel.

Relax has no usable int4 dtype (the CPU runtime packs two per byte, LLVM reads one), so
int4 values travel in int8 containers through annotate and calibrate, and realize stores a
layer's weights packed here: the flat (row-major) weight, two values per uint8, the even
element in the low nibble. The kernel is one TE compute (unpack + integer conv2d / matmul)
called with ``call_tir``: its inputs are the activation and the packed constant, so no
constant folding can widen the weights back into an int8 constant before the build.
"""

from __future__ import annotations

import numpy as np
from tvm import te, topi

INT4_MIN, INT4_MAX = -8, 7


def fits_int4(values: np.ndarray) -> bool:
    """Whether integer weights can be stored as int4 without loss."""
    return values.size > 0 and int(values.min()) >= INT4_MIN and int(values.max()) <= INT4_MAX


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Flat int4 values (in any integer container) -> uint8, two per byte, low nibble first."""
    flat = np.asarray(values, dtype="int64").reshape(-1)
    assert flat.size == 0 or (flat.min() >= INT4_MIN and flat.max() <= INT4_MAX), "not int4"
    if flat.size % 2:
        flat = np.concatenate([flat, [0]])
    nibbles = (flat & 0xF).astype("uint8")
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype("uint8")


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    """The numpy reference of the kernel's unpack: uint8 pairs -> int8 of ``shape``."""
    count = int(np.prod(shape))
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:count].astype("int8")
    return ((nibbles ^ 8) - 8).astype("int8").reshape(shape)


def _unpacked(packed: te.Tensor, shape) -> te.Tensor:
    """The TE view of the packed weight as int8 values of ``shape`` (sign-extended)."""

    def value(*index):
        flat = index[0]
        for axis, i in zip(shape[1:], index[1:], strict=True):
            flat = flat * int(axis) + i
        byte = packed[flat // 2].astype("int32")
        nibble = (byte >> ((flat % 2) * 4)) & 15
        return ((nibble ^ 8) - 8).astype("int8")

    return te.compute([int(d) for d in shape], value, name="unpack_int4")


def conv2d_int4(x: te.Tensor, packed: te.Tensor, *, weight_shape, strides, padding, dilation,
                groups: int) -> te.Tensor:
    """int8/uint8 NCHW activations x packed int4 OIHW weights -> int32."""
    weight = _unpacked(packed, weight_shape)
    return topi.nn.conv(x, weight, strides, padding, dilation, groups, "NCHW", "OIHW",
                        out_dtype="int32")


def matmul_int4(x: te.Tensor, packed: te.Tensor, *, weight_shape) -> te.Tensor:
    """int8/uint8 ``[..., K]`` x packed int4 ``[K, N]`` -> int32 ``[..., N]``."""
    weight = _unpacked(packed, weight_shape)
    k = te.reduce_axis((0, int(weight_shape[0])), name="k")
    shape = [*x.shape[:-1], int(weight_shape[1])]

    def dot(*index):
        batch, n = index[:-1], index[-1]
        return te.sum(x[(*batch, k)].astype("int32") * weight[k, n].astype("int32"), axis=k)

    return te.compute(shape, dot, name="matmul_int4")
