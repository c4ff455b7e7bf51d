"""SelectBits: choose INT4 or INT8 weights per layer (mixed precision) under a budget.

Runs on ``main`` after batch-norm folding and ``FoldConstant`` and before
``AnnotateQuantization``, which reads the choice from ``main``'s ``tvmq.weight_bits``
attribute (per-layer ``QConfig`` overrides still win). It needs the calibration data.

Sensitivity. For each layer with weights, the measure is the noise power that dropping only
that layer's weights from INT8 to INT4 adds to the network's outputs, relative to the
outputs' power, on the calibration data::

    sensitivity(L) = sum ||f_L4(x) - f_8(x)||^2 / sum ||f_8(x)||^2

where ``f_8`` is the simulated (QDQ) all-INT8 model and ``f_L4`` the same model with layer L's
weights at INT4. Why this measure: (1) it is measured at the outputs, so it sees how much
of a layer's error the rest of the network amplifies or absorbs, which a per-layer weight
error does not; (2) quantization noise of different layers is close to independent, so
their powers add at the output, which is exactly the additive objective the integer
program minimizes (HAWQ's Hessian trace is the second-order estimate of the same
quantity); (3) it needs no labels and works for any output (logits, boxes, embeddings),
unlike an accuracy drop, which is also too coarse on a few hundred images. The weights are
lifted into parameters of one simulated model, so one compile serves every layer.

Activations. Under ``--bops-budget`` (the one budget a 4-bit activation buys anything
in on CPUs, where it runs the 8-bit kernels) the solver chooses activation widths too, as
HAWQ-V3 does: per tensor, since a tensor is as wide as its widest reader needs (tensors tied
to one scale behind a max-pool go together), for tensors that only weight layers read and
no override fixes, when ``QConfig.activation_bits`` is 8. A tensor's sensitivity is the
same output noise power with only that tensor at 4 bits (its 4-bit range calibrated as
4-bit points are, over 16 levels). To measure all of them with one compile, the simulated
model's quantization points are float ops whose scale, zero point and clamp are
parameters.

Costs: packed weight bytes and bit-operations (MACs x weight bits x activation bits) per
layer at each width, from the shapes; latency, when a ``measure`` callable is given (the
build pipeline passes one for ``--latency-budget`` on a target that runs here), measured by
building each layer alone at INT4 and at INT8 (its input quantize, the integer kernel, its
requantize) and timing it. Layers whose outputs meet in a residual add or a concat are tied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from ..calibration_data import CalibrationSet, CalibrationSource, load_calibration_data
from ..errors import PipelineError
from ..qconfig import QConfig
from . import _observe
from ._int4 import stored_weight_bytes
from ._qdq import (
    BITS_ATTR,
    QPOINTS_ATTR,
    REPORT_ATTR,
    activation_levels,
    placeholder_index,
    quantize_weight,
    quantize_weight_grouped,
    read_json_attr,
    tied_point_groups,
    with_json_attr,
)
from .annotate import AnnotateQuantization
from .bit_allocation import ActivationGroup, Budget, BudgetKind, LayerCost, allocate_bits
from .calibrate import Calibrate, _feed_list, _model_inputs

_WIDTHS = (4, 8)


@tvm.transform.module_pass(opt_level=0, name="SelectBits")
class SelectBits:
    """Measure each layer's INT4 sensitivity and costs, then solve for bits under a budget.

    Parameters
    ----------
    dataset : path, iterable of dicts or CalibrationSet
        Calibration data (see :mod:`tvmq.calibration_data`).
    budget : Budget
        The size, latency or bit-operation limit.
    qconfig : QConfig, optional
        Calibration method, layers to skip and per-layer overrides (which are fixed).
    batches : int
        Calibration batches the sensitivity runs use.
    latencies : mapping of layer name to {bits: seconds}, optional
        Measured kernel latencies, for a latency budget.
    measure : callable, optional
        ``measure(lone_layer_module, inputs) -> seconds`` (``tvmq.layer_latency``): each
        layer's INT4 and INT8 kernels are built alone and timed with it.
    """

    def __init__(
        self,
        dataset: CalibrationSource | CalibrationSet,
        budget: Budget,
        qconfig: QConfig | None = None,
        *,
        batches: int = 64,
        latencies: Mapping[str, Mapping[int, float]] | None = None,
        measure: Callable[[tvm.IRModule, list], float] | None = None,
    ) -> None:
        self.dataset = dataset
        self.budget = budget
        self.qconfig = qconfig or QConfig()
        self.batches = batches
        self.latencies = dict(latencies or {})
        self.measure = measure

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        main = mod["main"]
        if QPOINTS_ATTR in (main.attrs or {}) or BITS_ATTR in (main.attrs or {}):
            return mod  # already annotated, or bits already chosen
        table, ties, groups = self._measure(mod)
        if not table:
            return mod
        fixed = {
            layer.name: bits for layer in table
            if (bits := self.qconfig.override_bits(layer.name)) is not None
        }
        allocation = allocate_bits(table, self.budget, ties=ties, fixed=fixed,
                                   activations=groups)
        read = {name: group for group in groups for name in group.readers}
        chosen = {
            layer.name: {
                "bits": allocation.bits[layer.name],
                **({"activation_bits": allocation.activation_bits[layer.name],
                    "activation_sensitivity": {
                        str(b): v for b, v in read[layer.name].sensitivity.items()},
                    "activation_bits_from": "solver"}
                   if layer.name in allocation.activation_bits else {}),
                "sensitivity": {str(b): layer.sensitivity[b] for b in layer.bits},
                "weight_bytes_by_bits": {str(b): layer.weight_bytes[b] for b in layer.bits},
                "bops_by_bits": {str(b): layer.bops[b] for b in layer.bits},
                **({"latency_s_by_bits": {str(b): layer.latency[b] for b in layer.bits}}
                   if layer.latency else {}),
                "bits_from": "override" if layer.name in fixed else "solver",
            }
            for layer in table
        }
        mod = mod.clone()
        mod["main"] = with_json_attr(main, BITS_ATTR, chosen)
        return mod

    def _measure(self, mod: tvm.IRModule
                 ) -> tuple[list[LayerCost], list[list[str]], list[ActivationGroup]]:
        """The cost table, tie groups and activation groups, from the model at INT8."""
        probe_config = dataclasses.replace(self.qconfig, weight_bits=8)
        annotated = AnnotateQuantization(probe_config)(mod)
        main = annotated["main"]
        points = read_json_attr(main, QPOINTS_ATTR, [])
        weight_layers = {layer["name"] for layer in read_json_attr(main, REPORT_ATTR, {
            "layers": []})["layers"] if "weight_bits" in layer}
        members = self._activation_choices(points, weight_layers)
        # One pass over the calibration data gives the points' ranges at both widths.
        calibrated = Calibrate(self.dataset, self.qconfig.calibration,
                               percentile=self.qconfig.percentile, report_batches=0,
                               narrow_points=bool(members))(annotated)
        report = read_json_attr(calibrated["main"], REPORT_ATTR, {"layers": []})
        layers = [layer for layer in report["layers"] if "weight_bits" in layer]
        if not layers:
            return [], [], []
        narrow = report.get("points_at_4")
        lifted, weights = _lift_weights(main)
        if len(weights) != len(layers):
            raise PipelineError(
                f"SelectBits found {len(weights)} weight constants for {len(layers)} layers; "
                "run it on the model before AnnotateQuantization"
            )
        lifted = _lift_points(lifted, len(points))
        vm = _observe.build(lifted, mod)
        data = list(load_calibration_data(self.dataset, _model_inputs(main)))[: self.batches]
        feeds = [[tvm.runtime.tensor(f) for f in _feed_list(main, batch)] for batch in data]
        for weight in weights:
            weight.group_size = self.qconfig.weight_group_size
        base = [tvm.runtime.tensor(w.dequantized()) for w in weights]
        wide = _point_arguments(points, report["points"])

        def outputs(weight_args, point_args):
            result = []
            for feed in feeds:
                out = vm["main"](*feed, *weight_args, *point_args)
                fields = [out] if hasattr(out, "numpy") else list(out)
                result.append([f.numpy().astype("float64") for f in fields])
            return result

        reference = outputs(base, wide)
        signal = sum(float(np.sum(o**2)) for batch in reference for o in batch) or 1.0

        def sensitivity(weight_args, point_args) -> float:
            noise = sum(
                float(np.sum((o - r) ** 2))
                for got, ref in zip(outputs(weight_args, point_args), reference, strict=True)
                for o, r in zip(got, ref, strict=True)
            )
            return noise / signal

        table = []
        for i, (layer, weight) in enumerate(zip(layers, weights, strict=True)):
            args = list(base)
            args[i] = tvm.runtime.tensor(weight.dequantized(bits=4))
            size, macs = weight.q.size, int(layer["macs"])
            packed = stored_weight_bytes(weight.consumer, weight.q.shape, bits=4,
                                         axis=weight.axis, group_size=weight.group_size)
            act_bits = int(layer.get("activation_bits", 8))
            latency = self.latencies.get(layer["name"])
            if latency is None and self.measure is not None:
                latency = {b: self.measure(*_lone_layer(weight, b, layer)) for b in _WIDTHS}
            table.append(LayerCost(
                layer["name"],
                sensitivity={4: sensitivity(args, wide), 8: 0.0},
                weight_bytes={4: float(packed), 8: float(size)},
                bops={b: float(macs * b * act_bits) for b in _WIDTHS},
                latency={b: float(latency[b]) for b in _WIDTHS} if latency else None,
                activation_bits=act_bits,
            ))
        groups = []
        for indices, readers in members:
            at_four = _point_arguments(points, report["points"], narrow, indices)
            groups.append(ActivationGroup(
                f"input of {readers[0]}", tuple(readers),
                {4: sensitivity(base, at_four), 8: 0.0},
            ))
        return table, _ties(report), groups

    def _activation_choices(self, points: list[dict], weight_layers: set[str]
                            ) -> list[tuple[list[int], list[str]]]:
        """(point indices, readers) of each tensor whose activation width the solver may
        choose: under a bops budget, read only by weight layers, none overridden."""
        if self.budget.kind != BudgetKind.BOPS or self.qconfig.activation_bits != 8:
            return []
        choices = []
        for indices in tied_point_groups(points):
            readers = [name for i in indices for name in points[i].get("readers", [])]
            if readers and all(
                name in weight_layers and self.qconfig.override_activation_bits(name) is None
                for name in readers
            ):
                choices.append((indices, readers))
        return choices


def _point_arguments(points: list[dict], wide: list, narrow: list | None = None,
                     narrowed: list[int] = ()) -> list:
    """The lifted quantization points' parameters (``_lift_points``): scale, zero point and
    clamp of every point, at the bits it was calibrated for (``wide``), those in
    ``narrowed`` at 4 bits (``narrow``)."""
    scale, zero, low, high = (np.zeros(len(points), "float32") for _ in range(4))
    for point in points:
        i = point["index"]
        bits = 4 if i in narrowed else int(point.get("bits", 8))
        scale[i], zero[i] = (narrow if i in narrowed else wide)[i]
        low[i], high[i] = activation_levels(bits)
    return [tvm.runtime.tensor(a) for a in (scale, zero, low, high)]


def _lift_points(func: relax.Function, count: int) -> relax.Function:
    """``func`` (annotated, its points still placeholders) with each quantization point a
    float round-and-clamp whose scale, zero point and clamp are read from four parameters
    of ``count`` values each (one per point), appended to the parameters: so one compiled
    model simulates every point at any width."""
    params = [relax.Var(name, relax.TensorType([count], "float32"))
              for name in ("point_scale", "point_zero", "point_low", "point_high")]

    def entry(values: relax.Var, index: int) -> relax.Expr:
        return relax.op.strided_slice(values, axes=[0], begin=[index], end=[index + 1])

    blocks = []
    floats: dict[relax.Var, relax.Var] = {}  # an int8 point value -> its float stand-in
    for block in func.body.blocks:
        bindings = []
        for binding in block.bindings:
            value = binding.value
            op = getattr(value, "op", None)
            name = getattr(op, "name", "")
            index = placeholder_index(value) if name in ("relax.quantize",
                                                         "relax.dequantize") else None
            if name == "relax.quantize" and index is not None:
                scale, zero, low, high = (entry(p, index) for p in params)
                levels = relax.op.add(relax.op.round(relax.op.divide(value.args[0], scale)),
                                      zero)
                clamped = relax.op.minimum(relax.op.maximum(levels, low), high)
                new = relax.Var(binding.var.name, relax.TensorType(
                    binding.var.ty.shape, "float32"))
                floats[binding.var] = new
                bindings.append(relax.VarBinding(new, clamped))
                continue
            if name == "relax.clip" and value.args[0] in floats:
                new = relax.Var(binding.var.name, relax.TensorType(
                    binding.var.ty.shape, "float32"))
                floats[binding.var] = new
                bindings.append(relax.VarBinding(new, relax.Call(
                    value.op, [floats[value.args[0]], *value.args[1:]], value.attrs)))
                continue
            if name == "relax.dequantize" and index is not None and value.args[0] in floats:
                scale, zero = entry(params[0], index), entry(params[1], index)
                binding = relax.VarBinding(binding.var, relax.op.multiply(
                    relax.op.subtract(floats[value.args[0]], zero), scale))
            bindings.append(binding)
        blocks.append(relax.BindingBlock(bindings))
    lifted = relax.Function([*func.params, *params], relax.SeqExpr(blocks, func.body.body),
                            func.ret_ty, True, func.attrs)
    return relax.transform.Normalize()(tvm.IRModule({"main": lifted}))["main"]


@dataclasses.dataclass
class _Weight:
    q: np.ndarray
    scale: np.ndarray
    axis: int | None
    float_weight: np.ndarray
    consumer: relax.Call | None = None  # the conv2d / matmul that takes the weight
    group_size: int | None = None  # group-wise INT4 (QConfig.weight_group_size)

    def dequantized(self, bits: int = 8) -> np.ndarray:
        if bits == 8:
            return self.float_weight
        # From the INT8 values: within half an INT8 step of the float weights, far below
        # the INT4 step, so the sensitivity is that of the real INT4 weights.
        q, scale = _quantize(self, bits)
        shape = [1] * q.ndim
        if self.axis is not None:
            shape[self.axis] = -1
        return (q.astype("float32") * scale.reshape(shape)).astype("float32")


def _quantize(weight: _Weight, bits: int) -> tuple[np.ndarray, np.ndarray]:
    if weight.group_size is not None and bits <= 4 and weight.axis is not None:
        return quantize_weight_grouped(weight.float_weight, axis=weight.axis, bits=bits,
                                       group_size=weight.group_size)
    return quantize_weight(weight.float_weight, axis=weight.axis, bits=bits)


def _lift_weights(func: relax.Function) -> tuple[relax.Function, list[_Weight]]:
    """``func`` with each layer's weight (a dequantized constant) replaced by a float
    parameter, one per consuming layer in order: layers whose weights are the same constant
    (deduplicated by the importer or a pass) still each get their own."""
    flat = relax.transform.ToNonDataflow()(tvm.IRModule({"main": func}))["main"]
    dequantized: dict[relax.Var, tuple] = {}
    for block in flat.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.Call)
                and getattr(value.op, "name", "") == "relax.dequantize"
                and isinstance(value.args[0], Constant)
                and value.args[0].value.numpy().ndim >= 2
            ):
                dequantized[binding.var] = _read_weight(value)
    weights: list[_Weight] = []
    params = []
    blocks = []
    for block in flat.body.blocks:
        bindings = []
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.Call)
                and len(value.args) > 1
                and value.args[1] in dequantized
            ):
                q, scale, axis, weight = dequantized[value.args[1]]
                param = relax.Var(f"w{len(params)}", relax.TensorType(list(q.shape), "float32"))
                params.append(param)
                weights.append(_Weight(q, scale, axis, weight, consumer=value))
                value = relax.Call(value.op, [value.args[0], param, *value.args[2:]],
                                   value.attrs, value.ty_args)
                binding = relax.VarBinding(binding.var, value)
            bindings.append(binding)
        blocks.append(relax.BindingBlock(bindings))
    count = int(flat.attrs["num_input"]) if flat.attrs and "num_input" in flat.attrs else len(
        flat.params
    )
    body = relax.SeqExpr(blocks, flat.body.body)
    lifted = relax.Function(list(flat.params)[:count] + params, body, flat.ret_ty, True,
                            flat.attrs)
    lifted = relax.transform.Normalize()(tvm.IRModule({"main": lifted}))["main"]
    return lifted, weights


def _read_weight(dequantize: relax.Call) -> tuple:
    """(int8 values, scales, axis or None, float weight) of a weight dequantize."""
    q = dequantize.args[0].value.numpy()
    scale = dequantize.args[1].value.numpy().astype("float32").reshape(-1)
    axis = int(dequantize.attrs.axis) % q.ndim if scale.size > 1 else None
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q, scale, axis, (q.astype("float32") * scale.reshape(shape)).astype("float32")


def _ties(report: dict) -> list[list[str]]:
    """Weight layers whose outputs meet in one add or concat (they share its scale)."""
    producer = {
        layer["output_point"]: layer["name"] for layer in report["layers"]
        if "weight_bits" in layer and layer.get("output_point") is not None
    }
    ties = []
    for layer in report["layers"]:
        if layer["op"] in ("add", "concat"):
            names = [producer[p] for p in layer.get("input_points", []) if p in producer]
            if len(names) > 1:
                ties.append(names)
    return ties



def _lone_layer(weight: _Weight, bits: int, layer: dict) -> tuple[tvm.IRModule, list]:
    """One layer alone, in QDQ form at ``bits``: what realize and the build make of it."""
    call = weight.consumer
    if call is None or not layer.get("input_scales"):
        raise PipelineError(f"SelectBits cannot build layer {layer['name']} alone to time it")
    shape = [int(d) for d in call.args[0].ty.shape]
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    scale_x = relax.const(layer["input_scales"][0], "float32")
    zero_x = relax.const(layer["input_zero_points"][0], "int8")
    q, scale = _quantize(weight, bits)
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            xq = builder.emit(relax.op.quantize(x, scale_x, zero_x))
            xd = builder.emit(relax.op.dequantize(xq, scale_x, zero_x))
            w = builder.emit(relax.op.dequantize(
                relax.const(q, "int8"),
                relax.const(scale if weight.axis is not None else scale.reshape(()), "float32"),
                relax.const(0, "int8"), axis=weight.axis if weight.axis is not None else -1,
            ))
            y = builder.emit(relax.Call(call.op, [xd, w], call.attrs))
            if layer.get("output_scale") is not None:
                y = builder.emit(relax.op.quantize(
                    y, relax.const(layer["output_scale"], "float32"),
                    relax.const(layer["output_zero_point"], "int8"),
                ))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    data = np.random.default_rng(0).normal(size=shape).astype("float32")
    return builder.get(), [data]
