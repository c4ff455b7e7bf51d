"""Calibrate: run the annotated model on data once, then choose every scale and zero point.

Runs after ``AnnotateQuantization`` and before ``RealizeQuantization``. The annotated
``main`` is compiled once as a float observer that returns every placeholder point's value
next to the outputs, so one VM run per batch collects the statistics of all points. Each
point's range comes from its statistics by the chosen method (min-max, percentile, KL
entropy as in TensorRT, or MSE); points behind a max-pool or a reshape share their input's
scale. The placeholders are then filled in, and the simulated (QDQ) model is run on a few
batches to measure each layer's SQNR against the float model for the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax

from ..calibration_data import CalibrationSet, CalibrationSource, load_calibration_data
from ..errors import PipelineError
from ..frontend import INPUT_NAMES_ATTR, TensorInfo
from ..qconfig import CalibrationMethod
from . import _observe
from ._qdq import (
    QPOINTS_ATTR,
    REPORT_ATTR,
    dequantize_pattern,
    placeholder_index,
    qparams,
    quantize_pattern,
    read_json_attr,
    with_json_attr,
)


@tvm.transform.module_pass(opt_level=0, name="Calibrate")
class Calibrate:
    """Collect statistics on ``dataset`` and fill in the annotated scales.

    Parameters
    ----------
    dataset : path, iterable of dicts or CalibrationSet
        See :mod:`tvmq.calibration_data`.
    method : CalibrationMethod
        ``minmax``, ``percentile``, ``kl`` or ``mse``.
    percentile : float
        The share of |values| kept by ``method="percentile"``.
    report_batches : int
        Batches the simulated model runs to measure each layer's SQNR (0: no SQNR).
    narrow_points : bool
        Also choose every point's scale and zero point at 4 bits from the same statistics,
        into the report's ``points_at_4`` (``points`` holds those at the annotated bits):
        what SelectBits times a 4-bit tensor with, without observing the model again.
    """

    def __init__(
        self,
        dataset: CalibrationSource | CalibrationSet,
        method: CalibrationMethod | str = CalibrationMethod.MINMAX,
        *,
        percentile: float = 99.99,
        report_batches: int = 32,
        narrow_points: bool = False,
    ) -> None:
        from ..qconfig import QConfig

        # QConfig validates the method and percentile with the same messages.
        checked = QConfig(calibration=method, percentile=percentile)
        self.dataset = dataset
        self.method = checked.calibration
        self.percentile = checked.percentile
        self.report_batches = report_batches
        self.narrow_points = narrow_points

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        main = mod["main"]
        points = read_json_attr(main, QPOINTS_ATTR, None)
        if points is None:
            return mod  # nothing annotated (or a pre-quantized model): nothing to calibrate
        data = load_calibration_data(self.dataset, _model_inputs(main))
        observer, order = _observe.expose(main, simulated=False)
        vm = _observe.build(observer, mod)
        stats = {i: _observe.PointStats() for i in order}
        for feeds in data:
            _, values = _observe.run(vm, _feed_list(main, feeds))
            for index, value in zip(order, values, strict=True):
                stats[index].update(value)
        chosen = self._choose(points, stats)
        calibrated = _fill(main, chosen)
        report = read_json_attr(main, REPORT_ATTR, {"layers": [], "float_ops": []})
        report["calibration"] = {
            "method": self.method.value,
            "batches": len(data),
            **({"percentile": self.percentile}
               if self.method == CalibrationMethod.PERCENTILE else {}),
        }
        if self.report_batches > 0:
            _measure_sqnr(report, mod, chosen, vm, data, self.report_batches)
        _describe_points(report, chosen)
        if self.narrow_points:
            narrow = self._choose([{**point, "bits": 4} for point in points], stats)
            report["points_at_4"] = [list(narrow[i]) for i in sorted(narrow)]
        calibrated = with_json_attr(calibrated, REPORT_ATTR, report)
        calibrated = calibrated.without_attr(QPOINTS_ATTR)
        mod = mod.clone()
        mod["main"] = calibrated
        return mod

    def _choose(self, points: list[dict], stats: dict) -> dict[int, tuple[float, int]]:
        chosen: dict[int, tuple[float, int]] = {}
        for point in points:
            index = point["index"]
            if point["tie"] is not None:
                continue
            s = stats.get(index)
            if s is None:
                raise PipelineError(
                    f"Calibrate found no value for quantization point {index}; run "
                    "AnnotateQuantization again on the unmodified model"
                )
            bits = point.get("bits", 8)
            lo, hi = _range(s, self.method, self.percentile, point["symmetric"], bits)
            chosen[index] = qparams(lo, hi, symmetric=point["symmetric"], bits=bits)
        for point in points:
            tie = point["tie"]
            while tie is not None and tie not in chosen:
                tie = points[tie]["tie"]
            if point["tie"] is not None:
                chosen[point["index"]] = chosen[tie]
        return chosen


def _model_inputs(func: relax.Function) -> list[TensorInfo]:
    attrs = func.attrs or {}
    count = int(attrs["num_input"]) if "num_input" in attrs else len(func.params)
    params = list(func.params)[:count]
    names = [str(n) for n in attrs[INPUT_NAMES_ATTR]] if INPUT_NAMES_ATTR in attrs else []
    if len(names) != len(params):
        names = [p.name for p in params]
    return [
        TensorInfo(n, tuple(int(d) for d in p.ty.shape), str(p.ty.dtype))
        for n, p in zip(names, params, strict=True)
    ]


def _feed_list(func: relax.Function, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [feeds[info.name] for info in _model_inputs(func)]


def _range(stats, method: CalibrationMethod, percentile: float, symmetric: bool,
           bits: int = 8):
    """The real range [lo, hi] a point of ``bits`` bits is quantized over."""
    if method == CalibrationMethod.MINMAX or stats.edge == 0:
        return stats.lo, stats.hi
    width = stats.edge / stats.counts.size
    one_sided = stats.lo >= 0 and not symmetric
    if method == CalibrationMethod.PERCENTILE:
        cdf = np.cumsum(stats.counts) / stats.counts.sum()
        threshold = (int(np.searchsorted(cdf, percentile / 100.0)) + 1) * width
    elif method == CalibrationMethod.KL:
        threshold = _kl_threshold(stats.counts, 2**bits if one_sided else 2 ** (bits - 1)) * width
    else:
        levels = 2**bits - 1 if one_sided else 2 ** (bits - 1) - 1
        threshold = _mse_threshold(stats.counts, width, levels)
    threshold = min(threshold, stats.edge)
    return max(stats.lo, -threshold), min(stats.hi, threshold)


def _kl_threshold(counts: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: the bin count whose clipped, requantized histogram
    diverges least (KL) from the reference histogram."""
    counts = counts.astype("float64")
    best, best_bins = math.inf, counts.size
    for bins in range(levels, counts.size + 1, 16):
        reference = counts[:bins].copy()
        reference[-1] += counts[bins:].sum()
        nonzero = counts[:bins] != 0
        # Merge `bins` into `levels` groups, spread each group's sum over its nonzero bins.
        group = np.arange(bins) * levels // bins
        sums = np.bincount(group, weights=counts[:bins], minlength=levels)
        sizes = np.bincount(group, weights=nonzero, minlength=levels)
        expanded = np.where(nonzero, sums[group] / np.maximum(sizes[group], 1), 0.0)
        p = reference / reference.sum()
        q = expanded / max(expanded.sum(), 1e-30)
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best:
            best, best_bins = divergence, bins
    return best_bins


def _mse_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """The clipping threshold with the least expected squared quantization error."""
    centers = (np.arange(counts.size) + 0.5) * width
    candidates = np.linspace(0.2, 1.0, 81) * counts.size * width
    steps = candidates / levels
    clipped = np.minimum(centers[None, :], candidates[:, None])
    rounded = np.round(clipped / steps[:, None]) * steps[:, None]
    error = ((rounded - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1)
    return float(candidates[int(np.argmin(error))])


def _fill(func: relax.Function, chosen: dict[int, tuple[float, int]]) -> relax.Function:
    """Replace the placeholder scales and zero points with the chosen ones."""

    def rewrite(call: relax.Call, _matchings) -> relax.Expr:
        index = placeholder_index(call)
        if index is None:
            return call
        scale, zero = chosen[index]
        args = [call.args[0], relax.const(scale, "float32"), relax.const(zero, "int8")]
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    func = relax.dpl.rewrite_call(quantize_pattern(), rewrite, func)
    return relax.dpl.rewrite_call(dequantize_pattern(), rewrite, func)


def _measure_sqnr(report, mod, chosen, float_vm, data: Sequence, batches: int) -> None:
    """SQNR (dB) of each layer's output in the simulated model against the float model."""
    simulated, order = _observe.expose(mod["main"], simulated=True)
    sim_vm = _observe.build(_fill(simulated, chosen), mod)
    wanted = {}
    for layer in report["layers"]:
        if layer.get("output_point") is not None:
            wanted[layer["name"]] = ("point", order.index(layer["output_point"]))
        elif layer.get("output") is not None:
            wanted[layer["name"]] = ("output", layer["output"])
    signal = dict.fromkeys(wanted, 0.0)
    noise = dict.fromkeys(wanted, 0.0)
    for feeds in list(data)[:batches]:
        feed_list = _feed_list(mod["main"], feeds)
        float_out, float_points = _observe.run(float_vm, feed_list)
        sim_out, sim_points = _observe.run(sim_vm, feed_list)
        for name, (kind, i) in wanted.items():
            ref, got = (float_points[i], sim_points[i]) if kind == "point" else (
                float_out[i], sim_out[i]
            )
            signal[name] += float(np.sum(ref.astype("float64") ** 2))
            noise[name] += float(np.sum((ref.astype("float64") - got) ** 2))
    for layer in report["layers"]:
        name = layer["name"]
        if name in wanted:
            layer["sqnr_db"] = (
                round(10 * math.log10(signal[name] / noise[name]), 2)
                if noise[name] > 0 and signal[name] > 0 else None
            )


def _describe_points(report: dict, chosen: dict[int, tuple[float, int]]) -> None:
    report["points"] = [list(chosen[i]) for i in sorted(chosen)]  # [scale, zero] per point
    for layer in report["layers"]:
        layer["input_scales"] = [chosen[i][0] for i in layer.get("input_points", [])]
        layer["input_zero_points"] = [chosen[i][1] for i in layer.get("input_points", [])]
        out = layer.get("output_point")
        layer["output_scale"] = chosen[out][0] if out is not None else None
        layer["output_zero_point"] = chosen[out][1] if out is not None else None
