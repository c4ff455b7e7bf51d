"""Helpers shared by the quantization passes: QDQ placeholders, scale math, requantize.

The simulated (QDQ) form is ``R.dequantize(R.quantize(x, s, z), s, z)``. Annotate writes
placeholders whose scale is ``-(index + 1)``: a negative scale cannot come from calibration,
and the index ties the placeholder to its record in ``main``'s ``tvmq.qpoints`` attribute
even after other passes reorder or drop bindings.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.dpl import is_const, is_op, wildcard

from .bit_allocation import connected_groups

# Function attributes written by the passes (JSON strings: plain data that passes keep).
QPOINTS_ATTR = "tvmq.qpoints"
REPORT_ATTR = "tvmq.quantization"
# Written by SelectBits, read by AnnotateQuantization: per layer, the chosen weight bits and
# the costs they were chosen by.
BITS_ATTR = "tvmq.weight_bits"

QMIN = {"int8": -128, "uint8": 0}
QMAX = {"int8": 127, "uint8": 255}


# ---------------------------------------------------------------------------- patterns


def quantize_pattern(data=None):
    """``R.quantize(data, const, const)``."""
    return is_op("relax.quantize")(data or wildcard(), is_const(), is_const())


def dequantize_pattern(data=None):
    """``R.dequantize(data, const, const)``."""
    return is_op("relax.dequantize")(data or wildcard(), is_const(), is_const())


# -------------------------------------------------------------------------- placeholders


def placeholder_scale(index: int) -> Constant:
    return relax.const(-(index + 1.0), "float32")


def placeholder_index(call: relax.Call) -> int | None:
    """The point index of a placeholder quantize/dequantize, or None for a real one."""
    scale = call.args[1]
    if not isinstance(scale, Constant) or scale.value.numpy().size != 1:
        return None
    value = float(scale.value.numpy().reshape(()))
    return round(-value) - 1 if value < 0 else None


def tied_point_groups(points: list[dict]) -> list[list[int]]:
    """Indices of the quantization points (``tvmq.qpoints`` records, indexed in order) that
    share one scale: each point with the points it is tied to (behind a max-pool or a
    reshape)."""
    return connected_groups(len(points), [(p["index"], p["tie"]) for p in points
                                          if p.get("tie") is not None])


def read_json_attr(func: relax.Function, key: str, default):
    attrs = func.attrs or {}
    return json.loads(str(attrs[key])) if key in attrs else default


def with_json_attr(func: relax.Function, key: str, value) -> relax.Function:
    return func.with_attr(key, json.dumps(value, sort_keys=True))


# ----------------------------------------------------------------------- scale math


def activation_levels(bits: int) -> tuple[int, int]:
    """The int8-container range of a ``bits``-wide activation: [-128, 127] or [-8, 7]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qparams(lo: float, hi: float, *, symmetric: bool, bits: int = 8) -> tuple[float, int]:
    """Scale and zero point that map the real range [lo, hi] (widened to hold 0) onto the
    int8 container's ``activation_levels(bits)``.

    An empty range (a tensor that is all zeros) gets scale 1: any scale represents it.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = activation_levels(bits)
    if symmetric:
        bound = max(-lo, hi)
        scale = bound / qmax if bound > 0 else 1.0
        return float(np.float32(scale)), 0
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zero = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zero


def quantize_weight(
    weight: np.ndarray, *, axis: int | None, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer weights in an int8 container and their float32 scale(s).

    ``axis`` is the output-channel axis for one scale per channel, or None for one scale.
    """
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        bound = np.abs(weight).max(keepdims=True).reshape(1)
    else:
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        bound = np.abs(moved).max(axis=1)
    scale = np.where(bound > 0, bound / qmax, 1.0).astype("float32")
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype("int8")
    return q, scale


def quantize_weight_grouped(
    weight: np.ndarray, *, axis: int, bits: int, group_size: int, levels: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise symmetric weights, integer-only: ``w ~= q * m * scale``.

    Each output channel (``axis``) is cut into groups of ``group_size`` consecutive input
    elements (row-major over the other axes). ``q`` has ``bits`` bits, ``m`` in
    [1, levels] is the group's integer multiplier and ``scale`` is one float per channel,
    so the integer weights ``q * m`` (returned, int8 container, |q * m| <= 7 * 16) share
    the per-channel scale of an ordinary integer kernel. Returns (q * m, scale).
    """
    qmax = 2 ** (bits - 1) - 1
    assert qmax * levels <= 127, "q * m must fit in int8"
    moved = np.moveaxis(weight, axis, 0)
    channels = moved.shape[0]
    flat = moved.reshape(channels, -1).astype("float64")
    count = flat.shape[1]
    groups = -(-count // group_size)
    padded = np.zeros((channels, groups * group_size))
    padded[:, :count] = flat
    grouped = padded.reshape(channels, groups, group_size)
    group_scale = np.abs(grouped).max(axis=2) / qmax
    scale = group_scale.max(axis=1) / levels
    scale = np.where(scale > 0, scale, 1.0).astype("float32")
    mult = np.clip(np.round(group_scale / scale[:, None]), 1, levels)
    step = mult * scale[:, None].astype("float64")
    q = np.clip(np.round(grouped / step[..., None]), -qmax, qmax)
    w_int = (q * mult[..., None]).reshape(channels, -1)[:, :count].reshape(moved.shape)
    return np.moveaxis(w_int, 0, axis).astype("int8"), scale


def fixed_point(real: np.ndarray, *, common: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dyadic form of positive multipliers: ``real ~= mult / 2**shift``, mult < 2**31.

    ``common=True`` gives every element the same shift (for sums of scaled terms).
    """
    real = np.asarray(real, dtype="float64")
    assert np.all(real >= 0) and np.all(np.isfinite(real)), real
    _, exponent = np.frexp(real)
    if common:
        exponent = np.full_like(exponent, exponent.max())
    shift = 31 - exponent.astype("int64")
    mult = np.round(np.ldexp(real, shift)).astype("int64")
    overflow = mult >= 2**31
    mult = np.where(overflow, mult >> 1, mult)
    shift = np.where(overflow, shift - 1, shift)
    if np.any(shift < 1):
        raise tvm.error.InternalError(f"requantize multiplier {real.max()} is too large")
    # A multiplier below 2**-31 rounds every int32 to 0 (but keeps the shift in range).
    tiny = shift > 62
    mult = np.where(tiny, 0, mult)
    shift = np.where(tiny, 62, shift)
    return mult.astype("int64"), shift.astype("int64")


# -------------------------------------------------------------- requantize (Relax)


def i64(value) -> Constant:
    return relax.const(np.asarray(value, dtype="int64"), "int64")


def channel_shape(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ndim tensor."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def rounding_shift(x: relax.Expr, shift: np.ndarray) -> relax.Expr:
    """``(x + 2**(shift-1)) >> shift`` on int64: round half up, no float."""
    rounding = np.left_shift(np.int64(1), shift - 1)
    return relax.op.right_shift(relax.op.add(x, i64(rounding)), i64(shift))


def clamp_cast(x: relax.Expr, lo: int, hi: int, dtype: str) -> relax.Expr:
    return relax.op.astype(relax.op.clip(x, int(lo), int(hi)), dtype)


def requantize(
    acc: relax.Expr,
    real_multiplier: np.ndarray,
    *,
    zero_point: int,
    bounds: tuple[int, int],
    dtype: str,
    axis: int = 1,
    ndim: int = 0,
) -> relax.Expr:
    """Integer ``acc`` (int32) -> ``dtype``: ``clamp(zp + round(acc * M))`` with dyadic M.

    ``real_multiplier`` is a scalar or one value per channel along ``axis`` of the
    ``ndim``-dimensional ``acc``.
    """
    mult, shift = fixed_point(np.asarray(real_multiplier).reshape(-1))
    wide = relax.op.multiply(
        relax.op.astype(acc, "int64"), i64(channel_shape(mult, ndim, axis))
    )
    scaled = rounding_shift(wide, channel_shape(shift, ndim, axis))
    return clamp_cast(relax.op.add(scaled, i64(zero_point)), *bounds, dtype)


def activation_bounds(
    act: relax.Call | None, scale: float, zero_point: int, dtype: str
) -> tuple[int, int]:
    """The saturating clamp of an output, with a folded ReLU or clip (ReLU6 is a clip)."""
    lo, hi = QMIN[dtype], QMAX[dtype]
    if act is None:
        return lo, hi
    name = act.op.name
    if name == "relax.nn.relu":
        return max(lo, zero_point), hi
    low, high = clip_bounds(act)
    if np.isfinite(low):
        lo = max(lo, zero_point + int(np.round(low / scale)))
    if np.isfinite(high):
        hi = min(hi, zero_point + int(np.round(high / scale)))
    return lo, max(lo, hi)


def clip_bounds(clip: relax.Call) -> tuple[float, float]:
    """The (min, max) of a ``relax.clip``: PrimValues of an IntImm / FloatImm (or, read back,
    a number)."""
    low, high = (float(getattr(arg.value, "value", arg.value)) for arg in clip.args[1:3])
    return low, high


def const_value(expr: relax.Expr) -> np.ndarray:
    assert isinstance(expr, Constant), expr
    return expr.value.numpy()


def scalar(expr: relax.Expr) -> float | None:
    """The value of a one-element constant, or None."""
    if not isinstance(expr, Constant) or expr.value.numpy().size != 1:
        return None
    return expr.value.numpy().reshape(()).item()
