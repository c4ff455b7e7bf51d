"""AnnotateQuantization: mark where the model is quantized, in simulated (QDQ) form.

Runs on ``main`` after batch-norm folding and ``FoldConstant`` (weights must be constants)
and before ``Calibrate``. Every activation input of a quantizable op gets one
``dequantize(quantize(x))`` pair, shared by all of x's quantized consumers, with a
placeholder scale that ``Calibrate`` fills in; weights are quantized here (they need no
data). Quantizable: conv2d (grouped and depthwise too) and matmul with constant weights,
with a following bias add and ReLU / clip (ReLU6 is a clip) folded into the layer; residual add;
concat; max / avg / global pools; and data movement (reshape, ...) between quantized ops.
Everything else stays float, and the report in ``main``'s ``tvmq.quantization`` attribute
says why. A module that already holds quantize ops (a pre-quantized model) is left alone.

4-bit activations (``QConfig.activation_bits=4`` or a per-layer override: W4A4 layers) are
``dequantize(clip(quantize(x), -8, 7))``: 16 levels in the int8 container, which realize
keeps as the integer clamp of the producing kernel. A point is as wide as the widest of
its readers asks, and points tied to one scale (behind a max-pool or a reshape) share
their bits; the report says where a layer reads wider activations than it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.dpl import is_const, is_op, wildcard

from ..errors import PipelineError
from ..qconfig import ActivationScheme, Granularity, QConfig
from ._int4 import stored_weight_bytes
from ._qdq import (
    BITS_ATTR,
    QPOINTS_ATTR,
    REPORT_ATTR,
    activation_levels,
    placeholder_scale,
    quantize_weight,
    quantize_weight_grouped,
    read_json_attr,
    tied_point_groups,
    with_json_attr,
)

_CONV = is_op("relax.nn.conv2d")(wildcard(), is_const())
_MATMUL = is_op("relax.matmul")(wildcard(), is_const())
_BIAS = is_op("relax.add")(wildcard(), is_const())
_ACTIVATION = (
    is_op("relax.nn.relu")(wildcard())
    | is_op("relax.clip")(wildcard(), wildcard(), wildcard())
)
_POOLS = ("nn.max_pool2d", "nn.avg_pool2d", "nn.adaptive_avg_pool2d", "mean")
_MOVES = ("reshape", "permute_dims", "squeeze", "expand_dims", "flatten")
# Ops that share their input's scale: their output is a subset of their input's values.
_TIED = ("nn.max_pool2d", *_MOVES)
_FLOAT_REASONS = {
    "nn.softmax": "softmax needs float exp and division",
    "nn.log_softmax": "log-softmax needs float exp and log",
    "nn.layer_norm": "layer norm statistics lose too much precision in int8",
    "nn.group_norm": "group norm statistics lose too much precision in int8",
    "nn.rms_norm": "RMS norm statistics lose too much precision in int8",
    "nn.gelu": "GELU is not piecewise linear; no integer kernel",
    "nn.gelu_tanh": "GELU is not piecewise linear; no integer kernel",
    "nn.silu": "SiLU is not piecewise linear; no integer kernel",
    "sigmoid": "sigmoid is not piecewise linear; no integer kernel",
    "tanh": "tanh is not piecewise linear; no integer kernel",
    "multiply": "elementwise multiply has no integer kernel yet",
    "divide": "elementwise divide has no integer kernel",
}


@dataclass
class _Layer:
    name: str
    op: str
    call: relax.Call
    activation_args: tuple[int, ...]
    weight_arg: int | None = None
    weight_axis: int | None = None
    fused: list[str] = field(default_factory=list)
    output: relax.Var | None = None
    inputs: list[int] = field(default_factory=list)
    record: dict = field(default_factory=dict)


@tvm.transform.module_pass(opt_level=0, name="AnnotateQuantization")
class AnnotateQuantization:
    """Insert simulated quantization (QDQ) around the inputs of quantizable ops.

    Parameters
    ----------
    qconfig : QConfig, optional
        Bits, granularity, scheme, layers to skip, per-layer overrides.
    """

    def __init__(self, qconfig: QConfig | None = None) -> None:
        self.qconfig = qconfig or QConfig()

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            raise PipelineError("AnnotateQuantization needs a Relax function 'main' to quantize")
        main = mod["main"]
        if QPOINTS_ATTR in (main.attrs or {}) or _has_quantize(main):
            return mod  # already annotated, or pre-quantized: realize takes it as it is
        plan = _Plan(main, self.qconfig)
        annotated = _Annotator(plan, mod).visit_expr(main)
        annotated = with_json_attr(annotated, QPOINTS_ATTR, plan.points)
        annotated = with_json_attr(annotated, REPORT_ATTR, plan.report())
        annotated = annotated.without_attr(BITS_ATTR)
        mod = mod.clone()
        mod["main"] = annotated
        return mod


def _has_quantize(func: relax.Function) -> bool:
    return any(
        isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.quantize"
        for v in relax.analysis.get_var2val(func).values()
    )


def _op_name(call: relax.Call) -> str:
    return str(call.op.name).removeprefix("relax.")


class _Plan:
    """Which ops are quantized layers, what folds into them, where the QDQ points go."""

    def __init__(self, func: relax.Function, qconfig: QConfig) -> None:
        self.qconfig = qconfig
        # Bits chosen by SelectBits (mixed INT4/INT8); per-layer overrides still win.
        self.allocation: dict[str, dict] = read_json_attr(func, BITS_ATTR, {})
        self.layers: dict[relax.Call, _Layer] = {}
        self.float_ops: list[dict] = []
        self.points: list[dict] = []
        self.point_of: dict[relax.Var, int] = {}
        self.requests: dict[int, list[int]] = {}  # point -> the bits its readers ask for
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.var2val = {b.var: b.value for b in bindings}
        self.uses = _use_counts(func, bindings)
        outputs = func.body.body
        outputs = list(outputs.fields) if isinstance(outputs, relax.Tuple) else [outputs]
        self.output_index = {v: i for i, v in enumerate(outputs) if isinstance(v, relax.Var)}
        self.quantized: dict[relax.Var, _Layer] = {}  # layer output var -> layer
        folded: set[relax.Var] = set()
        counters: dict[str, int] = {}
        for binding in bindings:
            value = binding.value
            if binding.var in folded or not isinstance(value, relax.Call):
                continue
            if not isinstance(value.op, tvm.ir.Op):
                continue
            op = _op_name(value)
            kind = self._kind(value, op)
            if kind is None:
                self._float(binding.var, op, _FLOAT_REASONS.get(op, f"no integer kernel for {op}"))
                continue
            name = f"{op.rsplit('.', 1)[-1]}_{counters.get(op, 0)}"
            counters[op] = counters.get(op, 0) + 1
            if qconfig.skips(name, op):
                self._float(binding.var, op, f"skipped by QConfig.skip ({name})", name)
                continue
            layer = _Layer(name, op, value, *kind)
            layer.output = self._fold(binding.var, layer, folded)
            self.layers[value] = layer
            self.quantized[layer.output] = layer
            for i in layer.activation_args:
                arg = value.args[i]
                for var in arg.fields if isinstance(arg, relax.Tuple) else [arg]:
                    layer.inputs.append(self._point(var, layer))
        self._settle_bits()

    def _kind(self, call: relax.Call, op: str):
        """(activation args, weight arg, weight channel axis) of a quantizable op, or None."""
        args = call.args
        if any(_dtype(a) not in ("float32", None) for a in args if not isinstance(a, relax.Tuple)):
            return None
        if _CONV.match(call) and _is_nchw(call) and _dtype(args[1]) == "float32":
            return (0,), 1, 0
        if _MATMUL.match(call) and len(args[1].ty.shape) == 2 and _dtype(args[1]) == "float32":
            return (0,), 1, 1
        if op == "add" and not any(isinstance(a, Constant) for a in args):
            return (0, 1), None, None
        if op == "concat" and isinstance(args[0], relax.Tuple):
            if all(isinstance(f, relax.Var) for f in args[0].fields):
                return (0,), None, None
            return None
        if op in _POOLS and _pool_ok(call, op):
            return (0,), None, None
        if op in _MOVES and isinstance(args[0], relax.Var) and args[0] in self.quantized:
            return (0,), None, None
        return None

    def _fold(self, var: relax.Var, layer: _Layer, folded: set) -> relax.Var:
        """Fold the bias add and activation that follow a layer; return the layer's output."""
        steps = []
        if layer.weight_arg is not None:
            steps.append(("bias", _BIAS))
        if layer.weight_arg is not None or layer.op == "add":
            steps.append(("activation", _ACTIVATION))
        for label, pattern in steps:
            user = self._single_user(var)
            if user is None or not pattern.match(self.var2val[user]):
                continue
            value = self.var2val[user]
            if not value.args[0].same_as(var):
                continue
            if label == "bias" and not _is_channel_bias(value.args[1], var, layer.weight_axis):
                continue
            layer.fused.append(_op_name(value) if label == "activation" else "bias")
            folded.add(user)
            var = user
        return var

    def _single_user(self, var: relax.Var) -> relax.Var | None:
        if self.uses.get(var, 0) != 1 or var in self.output_index:
            return None
        for user, value in self.var2val.items():
            if isinstance(value, relax.Call) and any(a.same_as(var) for a in value.args):
                return user
        return None

    def _point(self, var: relax.Var, consumer: _Layer) -> int:
        if var in self.point_of:
            self._request(self.point_of[var], consumer)
            return self.point_of[var]
        _, _, scheme = self.qconfig.for_layer(consumer.name)
        index = len(self.points)
        producer = self.quantized.get(var)
        tie = None
        if producer is not None and producer.op in _TIED and producer.inputs:
            tie = producer.inputs[0]
        self.points.append(
            {"index": index, "symmetric": scheme == ActivationScheme.SYMMETRIC, "tie": tie}
        )
        self.point_of[var] = index
        self._request(index, consumer)
        return index

    def _request(self, index: int, consumer: _Layer) -> None:
        """Note the activation bits ``consumer`` reads point ``index`` at; data movement
        (max-pool, reshape) takes what its own consumers ask for."""
        if consumer.op not in _TIED:
            self.requests.setdefault(index, []).append(self.activation_bits_for(consumer.name))
            self.points[index].setdefault("readers", []).append(consumer.name)

    def activation_bits_for(self, name: str) -> int:
        """The activation bits layer ``name`` asks for: a per-layer override, else the width
        SelectBits chose for it, else QConfig's."""
        chosen = self.allocation.get(name, {}).get("activation_bits")
        if chosen is not None and self.qconfig.override_activation_bits(name) is None:
            return int(chosen)
        return self.qconfig.activation_bits_for(name)

    def _settle_bits(self) -> None:
        """Each point's bits: the widest any of its readers asks for (a tensor that an 8-bit
        layer reads stays 8-bit), the same across points tied to one scale."""
        for members in tied_point_groups(self.points):
            asked = [b for i in members for b in self.requests.get(i, [])]
            bits = max(asked) if asked else self.qconfig.activation_bits
            for i in members:
                self.points[i]["bits"] = bits

    def input_bits(self, layer: _Layer) -> int:
        """The activation bits ``layer`` reads (the widest of its inputs)."""
        return max(self.points[i]["bits"] for i in layer.inputs)

    def _float(self, var: relax.Var, op: str, reason: str, name: str | None = None) -> None:
        if op in ("nn.relu", "clip") and reason.startswith("no integer kernel"):
            reason = "its input is not the output of a quantized conv/matmul/add"
        if op in _MOVES:
            reason = "data movement on a float tensor"
        entry = {"op": op, "reason": reason}
        if name:
            entry["layer"] = name
        self.float_ops.append(entry)

    def weight(self, layer: _Layer) -> tuple[np.ndarray, np.ndarray, int | None]:
        bits, granularity, _ = self.qconfig.for_layer(layer.name)
        chosen = self.allocation.get(layer.name)
        if chosen is not None and self.qconfig.override_bits(layer.name) is None:
            bits = int(chosen["bits"])
        weight = layer.call.args[layer.weight_arg].value.numpy()
        axis = layer.weight_axis if granularity == Granularity.PER_CHANNEL else None
        group = self.qconfig.weight_group_size
        if group is not None and bits <= 4 and axis is not None:
            # Group-wise INT4: q * m in the int8 container, the per-channel scale outside.
            q, scale = quantize_weight_grouped(weight, axis=axis, bits=bits, group_size=group)
            layer.record["weight_group_size"] = group
        else:
            q, scale = quantize_weight(weight, axis=axis, bits=bits)
        macs = weight_macs(layer.call)
        layer.record.update(
            weight_bits=bits,
            weight_granularity=granularity.value,
            weight_scales=[float(s) for s in scale],
            weight_bytes=stored_weight_bytes(layer.call, weight.shape, bits=bits, axis=axis,
                                             group_size=group),
            macs=macs,
            bops=macs * bits * self.input_bits(layer),
        )
        if chosen is not None:
            layer.record.update({k: v for k, v in chosen.items()
                                 if k not in ("bits", "activation_bits")})
        return q, scale, axis

    def report(self) -> dict:
        layers, float_ops = [], list(self.float_ops)
        for layer in self.layers.values():
            output_point = self.point_of.get(layer.output)
            output = self.output_index.get(layer.output)
            if layer.weight_arg is None and output_point is None:
                float_ops.append({
                    "op": layer.op, "layer": layer.name,
                    "reason": "its output feeds only float ops, so it runs on dequantized inputs",
                })
                continue
            _, _, scheme = self.qconfig.for_layer(layer.name)
            bits, asked = self.input_bits(layer), self.activation_bits_for(layer.name)
            if layer.op in _TIED:
                asked = bits
            layers.append({
                "name": layer.name, "op": layer.op, "fused": layer.fused,
                "input_points": layer.inputs, "output_point": output_point, "output": output,
                "activation_bits": bits,
                **({"activation_bits_note": f"asked for {asked}; its input is also read at "
                    f"{bits} bits"} if asked != bits else {}),
                "activation_scheme": scheme.value, **layer.record,
            })
        report = {"layers": layers, "float_ops": float_ops}
        if self.qconfig.weight_group_size is not None:
            report["weight_group_size"] = self.qconfig.weight_group_size  # for realize
        return report


@relax.expr_functor.mutator
class _Annotator(relax.PyExprMutator):
    def __init__(self, plan: _Plan, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.plan = plan
        self.dequantized: dict[relax.Var, relax.Var] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = self.visit_expr_post_order(call)
        layer = self.plan.layers.get(call)
        if layer is None:
            return new
        args = list(new.args)
        for i in layer.activation_args:
            arg = call.args[i]
            if isinstance(arg, relax.Tuple):
                args[i] = relax.Tuple([self._qdq(f) for f in arg.fields])
            else:
                args[i] = self._qdq(arg)
        if layer.weight_arg is not None:
            q, scale, axis = self.plan.weight(layer)
            args[layer.weight_arg] = relax.op.dequantize(
                relax.const(q, "int8"),
                relax.const(scale if axis is not None else scale.reshape(()), "float32"),
                relax.const(0, "int8"),
                axis=axis if axis is not None else -1,
            )
        return relax.Call(new.op, args, new.attrs, new.ty_args)

    def _qdq(self, var: relax.Var) -> relax.Var:
        if var not in self.dequantized:
            index = self.plan.point_of[var]
            scale = placeholder_scale(index)
            zero = relax.const(0, "int8")
            q = self.builder_.emit(relax.op.quantize(self.visit_expr(var), scale, zero))
            bits = self.plan.points[index]["bits"]
            if bits < 8:
                # Narrow activations: the integers clamped to their levels, in the container.
                q = self.builder_.emit(relax.op.clip(q, *activation_levels(bits)))
            self.dequantized[var] = self.builder_.emit(relax.op.dequantize(q, scale, zero))
        return self.dequantized[var]


def weight_macs(call: relax.Call) -> int:
    """Multiply-accumulates of a conv2d (OIHW weights) or matmul ([K, N] weights) call."""
    out = int(np.prod([int(d) for d in call.ty.shape]))
    weight = [int(d) for d in call.args[1].ty.shape]
    per_output = int(np.prod(weight[1:])) if len(weight) == 4 else weight[0]
    return out * per_output


def _dtype(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _is_nchw(call: relax.Call) -> bool:
    attrs = call.attrs
    return (
        attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW"
        and attrs.out_layout == "NCHW"
    )


def _pool_ok(call: relax.Call, op: str) -> bool:
    attrs = call.attrs
    if op == "mean":
        return True
    if attrs.layout != "NCHW" or attrs.out_layout != "NCHW":
        return False
    if op == "nn.adaptive_avg_pool2d":
        size = attrs.output_size
        return size is None or all(int(s) == 1 for s in size)
    if op == "nn.avg_pool2d":
        padded = any(int(p) for p in attrs.padding)
        return not attrs.ceil_mode and (not padded or attrs.count_include_pad)
    return True


def _is_channel_bias(bias: Constant, out: relax.Var, axis: int) -> bool:
    """A constant that adds one value per output channel (or one value overall)."""
    shape = bias.value.shape
    out_shape = [int(d) for d in out.ty.shape]
    channel_axis = 1 if axis == 0 else len(out_shape) - 1
    if int(np.prod(shape)) == 1 or len(shape) > len(out_shape):
        return int(np.prod(shape)) == 1
    padded = [1] * (len(out_shape) - len(shape)) + list(shape)
    return all(d == 1 or (i == channel_axis and d == out_shape[i]) for i, d in enumerate(padded))


def _use_counts(func: relax.Function, bindings) -> dict[relax.Var, int]:
    counts: dict[relax.Var, int] = {}
    for binding in bindings:
        for var in relax.analysis.free_vars(binding.value):
            counts[var] = counts.get(var, 0) + 1
    for var in relax.analysis.free_vars(func.body.body):
        counts[var] = counts.get(var, 0) + 1
    return counts
