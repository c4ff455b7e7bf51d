"""Observer variants of an annotated ``main`` and the statistics Calibrate keeps per point.

An observer returns ``(outputs, v_0, ..., v_n-1)``: the model's outputs and the value at
every QDQ placeholder, so one VM run per batch sees every point. The float observer drops
the placeholders (the values are the float model's); the simulated observer keeps them and
returns the dequantized values once the scales are filled in.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ._qdq import placeholder_index

_BINS = 2048


def expose(func: relax.Function, *, simulated: bool) -> tuple[relax.Function, list[int]]:
    """The observer of ``func`` and the point index of each extra output, in order."""
    flat = relax.transform.ToNonDataflow()(tvm.IRModule({"main": func}))["main"]
    quantized: dict[relax.Var, relax.Var] = {}  # placeholder quantize var -> its input
    observed: dict[int, relax.Expr] = {}
    blocks = []
    for block in flat.body.blocks:
        bindings = []
        for binding in block.bindings:
            value = binding.value
            name = getattr(getattr(value, "op", None), "name", "")
            is_qdq = name in ("relax.quantize", "relax.dequantize")
            index = placeholder_index(value) if is_qdq else None
            if name == "relax.quantize" and index is not None:
                quantized[binding.var] = value.args[0]
                if simulated:
                    bindings.append(binding)
                continue
            if name == "relax.clip" and value.args[0] in quantized:  # a narrow point's clamp
                quantized[binding.var] = quantized[value.args[0]]
                if simulated:
                    bindings.append(binding)
                continue
            if name == "relax.dequantize" and index is not None and value.args[0] in quantized:
                source = quantized[value.args[0]]
                if simulated:
                    bindings.append(binding)
                    observed.setdefault(index, binding.var)
                else:
                    bindings.append(relax.VarBinding(binding.var, source))
                    observed.setdefault(index, source)
                continue
            bindings.append(binding)
        blocks.append(relax.BindingBlock(bindings))
    order = sorted(observed)
    fields = [flat.body.body, *(observed[i] for i in order)]
    ret_ty = relax.TupleType([f.ty for f in fields])
    body = relax.SeqExpr(blocks, relax.Tuple(fields))
    observer = relax.Function(flat.params, body, ret_ty, True, flat.attrs)
    return relax.transform.Normalize()(tvm.IRModule({"main": observer}))["main"], order


def host_target() -> tvm.target.Target:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})


def build(func: relax.Function, context: tvm.IRModule | None = None) -> relax.VirtualMachine:
    """Compile an observer for this CPU, with tvmq's default schedules (untuned TVM loops
    would make calibrating a ResNet-50 take minutes); ``context`` is the module ``func``
    comes from."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvmq.schedules import default_schedule_passes

    target = host_target()
    # The functions ``func`` calls (PrimFuncs the importer emitted, e.g. for Clip) come along.
    others = {gv: f for gv, f in (context.functions_items() if context else []) if
              gv.name_hint != "main"}
    mod = tvm.IRModule({**others, "main": func})
    mod = relax.transform.ConvertToDataflow(min_size=1)(mod)
    passes = [
        *cpu.library_dispatch_passes(target),
        *cpu.legalize_passes(target),
        *default_schedule_passes(target),
        *cpu.dataflow_lower_passes(target),
        *cpu.finalize_passes(target),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes)(mod)
    return relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=None), tvm.cpu())


def run(vm: relax.VirtualMachine, feeds: list[np.ndarray]) -> tuple[list, list[np.ndarray]]:
    """(model outputs, observed values) of one run."""
    result = vm["main"](*(tvm.runtime.tensor(f) for f in feeds))
    outputs = result[0]
    outputs = [outputs.numpy()] if hasattr(outputs, "numpy") else [o.numpy() for o in outputs]
    return outputs, [result[i].numpy() for i in range(1, len(result))]


class PointStats:
    """Min, max and a histogram of the nonzero |x|, whose range doubles (merging bins) as
    values grow. Exact zeros (half of a ReLU output) are always representable, and their
    spike would otherwise pull KL and MSE thresholds down."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.edge = 0.0
        self.counts = np.zeros(_BINS, dtype="int64")

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype="float32").ravel()
        self.lo = min(self.lo, float(value.min()))
        self.hi = max(self.hi, float(value.max()))
        magnitude = np.abs(value)
        magnitude = magnitude[magnitude > 0]
        if magnitude.size == 0:
            return
        peak = float(magnitude.max())
        if self.edge == 0:
            self.edge = peak
        elif peak > self.edge:
            factor = 2 ** int(np.ceil(np.log2(peak / self.edge)))
            self.edge *= factor
            if factor >= _BINS:
                self.counts = np.concatenate([[self.counts.sum()], np.zeros(_BINS - 1, "int64")])
            else:
                merged = self.counts.reshape(-1, factor).sum(axis=1)
                self.counts = np.concatenate([merged, np.zeros(_BINS - merged.size, "int64")])
        self.counts += np.histogram(magnitude, bins=_BINS, range=(0.0, self.edge))[0]
