"""TagOrigins and RecordKernelOrigins: remember which ONNX nodes each kernel computes.

The frontend names each imported binding after its ONNX node and stores the map
(``tvmq.origins`` on ``main``: variable name -> node). Rewrites and FuseOps invent new
variable names, so names alone do not survive to the kernels. Instead:

- ``TagOrigins`` runs after LegalizeOps and before FuseOps, when every operation is a
  ``call_tir`` bound to a variable whose name still leads to its node. It gives each
  call its own copy of the callee PrimFunc carrying the node as the ``tvmq.origin``
  attribute.
- ``RecordKernelOrigins`` runs right after FuseOps: each kernel is a fused function made
  of tagged calls, or a tagged call in ``main``. It stores ``tvmq.kernel_origins`` (kernel
  name -> node names in order) on the module, for the manifest and the profiler.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax

from tvmq.frontend import ORIGINS_ATTR
from tvmq.kernels import KERNEL_ORIGINS_ATTR

_ORIGIN_ATTR = "tvmq.origin"


@tvm.transform.module_pass(opt_level=0, name="TagOrigins")
class TagOrigins:
    """Give every ``call_tir`` in ``main`` a callee tagged with its ONNX node."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        origins = dict((main.attrs or {}).get(ORIGINS_ATTR, {}))
        if not origins:
            return mod
        bindings = _bindings(main)
        nodes = [_lookup(origins, b.var.name) for b in bindings]
        # A binding a rewrite renamed beyond recognition belongs with the next known node
        # (the node whose result it computes a part of), or at the end with the last one.
        following = None
        for index in reversed(range(len(nodes))):
            following = nodes[index] = nodes[index] or following
        preceding = None
        for index in range(len(nodes)):
            preceding = nodes[index] = nodes[index] or preceding
        node_of = {b.var: n for b, n in zip(bindings, nodes, strict=True) if n is not None}
        tagger = _Tagger(mod, node_of)
        tagger.builder_.update_func(mod.get_global_var("main"), tagger.visit_expr(main))
        return relax.transform.DeadCodeElimination(["main"])(tagger.builder_.get())


@relax.expr_functor.mutator
class _Tagger(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, node_of: dict) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.node_of = node_of
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_var_binding_(self, binding) -> None:
        value, node = binding.value, self.node_of.get(binding.var)
        if node is None or not isinstance(value, relax.Call) or not value.op.same_as(self.call_tir):
            super().visit_var_binding_(binding)
            return
        function = self.mod_[value.args[0]]
        tagged = self.builder_.add_func(
            function.with_attr(_ORIGIN_ATTR, str(node)), value.args[0].name_hint
        )
        args = [self.visit_expr(a) for a in value.args[1:]]
        call = self.builder_.normalize(
            relax.Call(value.op, [tagged, *args], value.attrs, value.ty_args, value.span)
        )
        self.builder_.emit_normalized(relax.VarBinding(binding.var, call))


@tvm.transform.module_pass(opt_level=0, name="RecordKernelOrigins")
class RecordKernelOrigins:
    """Store ``tvmq.kernel_origins`` on the module; changes no function."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels: dict[str, list[str]] = {}
        for binding in _bindings(mod["main"]):
            callee = _callee(binding.value)
            if callee is None:
                continue
            function = mod[callee]
            calls = [function]
            if isinstance(function, relax.Function):
                calls = [mod[c] for b in _bindings(function) if (c := _callee(b.value))]
            nodes = kernels.setdefault(callee.name_hint, [])
            for call in calls:
                node = (call.attrs or {}).get(_ORIGIN_ATTR) if hasattr(call, "attrs") else None
                if node is not None and str(node) not in nodes:
                    nodes.append(str(node))
        return mod.with_attr(KERNEL_ORIGINS_ATTR, kernels)


def _lookup(origins: dict, name: str):
    # Rewrites that replace a binding call the new variable NAME_1, NAME_2, ...
    return origins.get(name) or origins.get(re.sub(r"_\d+$", "", name))


def _bindings(function) -> list:
    body = getattr(function, "body", None)
    if not isinstance(body, relax.SeqExpr):
        return []
    return [binding for block in body.blocks for binding in block.bindings]


def _callee(value) -> tvm.ir.GlobalVar | None:
    if not isinstance(value, relax.Call):
        return None
    if isinstance(value.op, tvm.ir.GlobalVar):
        return value.op
    if value.op.same_as(tvm.ir.Op.get("relax.call_tir")) and value.args:
        target = value.args[0]
        return target if isinstance(target, tvm.ir.GlobalVar) else None
    return None
