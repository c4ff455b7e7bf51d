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
from tvm import te, tirx, topi

INT4_MIN, INT4_MAX = -8, 7


def fits_int4(values: np.ndarray) -> bool:
    """Whether integer weights can be stored as int4 without loss."""
    return values.size > 0 and int(values.min()) >= INT4_MIN and int(values.max()) <= INT4_MAX


def stores_packed(call) -> bool:
    """Whether a layer's INT4 weights are stored packed (and unpacked inside its kernel).
    Depthwise convolutions keep theirs in int8 (still int4 values): a 3x3 filter per
    channel is ~2% of a MobileNet's weight bytes, and the packed depthwise kernel ran at
    a third of the INT8 depthwise kernel's speed."""
    if call.op.name != "relax.nn.conv2d":
        return True
    groups = int(call.attrs.groups)
    return groups == 1 or int(call.args[1].ty.shape[1]) != 1


def stored_weight_bytes(call, shape, *, bits: int, axis: int | None,
                        group_size: int | None) -> int:
    """The bytes realize stores a layer's weights in: two per byte at 4 bits or fewer (plus
    one uint8 multiplier per group when group-wise), one per weight otherwise or where the
    layer keeps them unpacked (:func:`stores_packed`)."""
    size = int(np.prod(shape))
    if bits > 4 or not stores_packed(call):
        return size
    extra = 0
    if group_size is not None and axis is not None:
        channels = int(shape[axis])
        extra = channels * -(-(size // channels) // group_size)
    return (size + 1) // 2 + extra


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Flat int4 values (in any integer container) -> uint8, two per byte, low nibble first."""
    flat = np.asarray(values, dtype="int64").reshape(-1)
    assert flat.size == 0 or (flat.min() >= INT4_MIN and flat.max() <= INT4_MAX), "not int4"
    if flat.size % 2:
        flat = np.concatenate([flat, [0]])
    nibbles = (flat & 0xF).astype("uint8")
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype("uint8")


def pack_int4_runs(values: np.ndarray, run: int) -> np.ndarray:
    """int4 values -> uint8 in runs of ``run`` (``kernel_layouts.int4_run``): byte t of a
    run holds its value t in the low nibble and value t + run / 2 in the high one, so a
    kernel unpacks half a run of bytes into two contiguous vectors of weights."""
    flat = np.asarray(values, dtype="int64").reshape(-1, run)
    assert flat.min() >= INT4_MIN and flat.max() <= INT4_MAX, "not int4"
    nibbles = (flat & 0xF).astype("uint8")
    half = run // 2
    return (nibbles[:, :half] | (nibbles[:, half:] << 4)).astype("uint8").reshape(-1)


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    """The numpy reference of the kernel's unpack: uint8 pairs -> int8 of ``shape``."""
    count = int(np.prod(shape))
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:count].astype("int8")
    return ((nibbles ^ 8) - 8).astype("int8").reshape(shape)


def pack_int4_rows(values: np.ndarray) -> np.ndarray:
    """int4 values [..., K] (K even) -> int8 bytes [..., K / 2], each row packed as
    :func:`pack_int4` packs (element 2q in the low nibble of byte q): the s4 tensor-core
    fragments' order (``schedules/cuda_int4.py``)."""
    values = np.asarray(values)
    assert values.shape[-1] % 2 == 0, "rows of int4 pairs"
    return pack_int4(values).view(np.int8).reshape(*values.shape[:-1], -1)


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_int4_rows`: int8 bytes [..., K / 2] -> int4 values [..., K]."""
    packed = np.asarray(packed)
    shape = (*packed.shape[:-1], 2 * packed.shape[-1])
    return unpack_int4(packed.view(np.uint8).reshape(-1), shape)


def pack_int4_te(values: te.Tensor) -> te.Tensor:
    """TE: int4 values in int8 [..., K] -> packed int8 [..., K / 2] (run-time activations)."""
    *lead, depth = (int(d) for d in values.shape)

    def byte(*index):
        *rest, q = index
        low = values[(*rest, 2 * q)] & tirx.const(0xF, "int8")
        return low | (values[(*rest, 2 * q + 1)] << tirx.const(4, "int8"))

    return te.compute((*lead, depth // 2), byte, name="pack_int4")


def patch_rows(x: te.Tensor, *, kernel, strides, padding, dilation, zero: int,
               depth: int) -> te.Tensor:
    """TE: NCHW int4 values (in int8) -> rows[(n, y, x), (c, ky, kx)], one row per output
    pixel holding its receptive field (``conv_to_gemm.im2col``, pixel-major), padded with
    the zero point (the real 0) outside the image and with 0 from the window's size up to
    ``depth`` (the weight rows are zero there)."""
    from .conv_to_gemm import im2col

    columns = im2col(x, kernel, strides, padding, dilation, pad_value=zero)
    batch, window, oh, ow = (int(d) for d in columns.shape)

    def value(p, k):
        rest = p % (oh * ow)
        read = columns[p // (oh * ow), tirx.min(k, window - 1), rest // ow, rest % ow]
        return tirx.if_then_else(k < window, read, tirx.const(0, "int8"))

    return te.compute((batch * oh * ow, depth), value, name="patch_rows")


def int4_matmul(a_packed: te.Tensor, b_packed: te.Tensor) -> te.Tensor:
    """TE: packed int4 ``a[M, K/2]`` times packed int4 ``b[N, K/2]`` (transposed) -> int32,
    the form ``schedules/cuda_int4.py`` puts on s4 tensor cores. The int4 buffers exist only
    as fragments there: a CPU (whose codegen mishandles int4) cannot run this kernel."""
    rows, half = (int(d) for d in a_packed.shape)
    cols = int(b_packed.shape[0])
    depth = 2 * half
    a4 = te.compute((rows, depth), lambda i, k: _nibble(a_packed, i, k), name="unpack_a")
    b4 = te.compute((cols, depth), lambda j, k: _nibble(b_packed, j, k), name="unpack_b")
    k = te.reduce_axis((0, depth), name="k")
    return te.compute(
        (rows, cols),
        lambda i, j: te.sum(a4[i, k].astype("int32") * b4[j, k].astype("int32"), axis=k),
        name="int4_matmul",
    )


def _nibble(packed, row, k):
    shift = (k % 2 * 4).astype("int8")
    return (packed[row, k // 2] >> shift).astype("int4")


def factor_groups(
    w_int: np.ndarray, *, axis: int, group_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Group-wise INT4 weights ``q * m`` (see ``_qdq.quantize_weight_grouped``) split back into
    int4 ``q`` (same layout) and uint8 multipliers ``m`` [channels, groups]; None if they do not
    factor. Any exact factoring will do: the kernel multiplies them back."""
    moved = np.moveaxis(w_int, axis, 0).astype("int64")
    channels = moved.shape[0]
    flat = moved.reshape(channels, -1)
    count = flat.shape[1]
    groups = -(-count // group_size)
    padded = np.zeros((channels, groups * group_size), dtype="int64")
    padded[:, :count] = flat
    grouped = padded.reshape(channels, groups, group_size)
    mult = np.gcd.reduce(np.abs(grouped), axis=2)
    mult = np.where(mult == 0, 1, mult)
    q = grouped // mult[..., None]
    if mult.max() > 255 or q.min() < INT4_MIN or q.max() > INT4_MAX:
        return None
    q = q.reshape(channels, -1)[:, :count].reshape(moved.shape)
    return np.moveaxis(q, 0, axis).astype("int8"), mult.astype("uint8")


def unpacked(packed: te.Tensor, shape, mult: te.Tensor | None = None, origin=None,
              group_size: int = 0, run: int | None = None) -> te.Tensor:
    """The TE view of the packed weight as int8 values of ``shape`` (sign-extended), times
    the group multiplier ``mult[channel, inner // group_size]`` when given, where
    ``origin(index)`` is the (output channel, input index) an element of ``shape`` holds.
    ``run``: packed in runs (:func:`pack_int4_runs`), else in flat pairs (:func:`pack_int4`)."""

    def value(*index):
        flat = index[0]
        for axis, i in zip(shape[1:], index[1:], strict=True):
            flat = flat * int(axis) + i
        if run is None:
            byte, high = packed[flat // 2].astype("int32"), flat % 2
        else:
            half, within = run // 2, flat % run
            byte = packed[flat // run * half + within % half].astype("int32")
            high = within // half
        nibble = (byte >> (high * 4)) & 15
        q = (nibble ^ 8) - 8
        if mult is None:
            return q.astype("int8")
        channel, inner = origin(index)
        # Padding (inputs to whole groups, columns to whole blocks) holds zeros; its
        # multiplier index only stays in range.
        group = te.min(inner // group_size, int(mult.shape[1]) - 1)
        channel = te.min(channel, int(mult.shape[0]) - 1)
        return (q * mult[channel, group].astype("int32")).astype("int8")

    return te.compute([int(d) for d in shape], value, name="unpack_int4")


def _oihw_origin(shape):
    _, _, kh, kw = (int(d) for d in shape)
    return lambda i: (i[0], (i[1] * kh + i[2]) * kw + i[3])


def blocked_conv_origin(shape):
    """(channel, input index) of an element of a blocked conv weight: [O/B, I, KH, KW, B] or
    grouped [O/B, I/g, KH, KW, B, g] (passes/conv_blocked.py)."""
    _, _, kh, kw, block, *group = (int(d) for d in shape)

    def origin(i):
        ic = i[1] * group[0] + i[5] if group else i[1]
        return i[0] * block + i[4], (ic * kh + i[2]) * kw + i[3]

    return origin


def blocked_matmul_origin(shape):
    """(column, row) of an element of a blocked matmul weight: [N/B, K, B] or grouped
    [N/B, K/g, B, g] (passes/matmul_blocked.py)."""
    _, _, block, *group = (int(d) for d in shape)
    return lambda i: (i[0] * block + i[2], i[1] * group[0] + i[3] if group else i[1])


def conv2d_int4(x: te.Tensor, packed: te.Tensor, *, weight_shape, strides, padding, dilation,
                groups: int, mult: te.Tensor | None = None, group_size: int = 0) -> te.Tensor:
    """int8/uint8 NCHW activations x packed int4 OIHW weights -> int32."""
    weight = unpacked(packed, weight_shape, mult, _oihw_origin(weight_shape), group_size)
    return topi.nn.conv(x, weight, strides, padding, dilation, groups, "NCHW", "OIHW",
                        out_dtype="int32")


def matmul_int4(x: te.Tensor, packed: te.Tensor, *, weight_shape, mult: te.Tensor | None = None,
                group_size: int = 0) -> te.Tensor:
    """int8/uint8 ``[..., K]`` x packed int4 ``[K, N]`` -> int32 ``[..., N]``."""
    weight = unpacked(packed, weight_shape, mult, lambda i: (i[1], i[0]), group_size)
    k = te.reduce_axis((0, int(weight_shape[0])), name="k")
    shape = [*x.shape[:-1], int(weight_shape[1])]

    def dot(*index):
        batch, n = index[:-1], index[-1]
        return te.sum(x[(*batch, k)].astype("int32") * weight[k, n].astype("int32"), axis=k)

    return te.compute(shape, dot, name="matmul_int4")
