"""Fold shape computations of an ONNX graph once its input shapes are static.

Exported models often compute shapes at run time (``Shape -> Slice -> Concat -> Reshape``,
``ConstantOfShape`` fed by a computed shape). The Relax importer rejects several of those
forms, so the frontend folds them before import: once every input shape is known, each
``Shape`` of a statically shaped tensor is a constant, and every node whose inputs are all
constants is evaluated with ONNX's reference evaluator and replaced by an initializer.

An inference ``Dropout`` whose mask nothing reads becomes the ``Identity`` it computes:
the importer would otherwise compute an all-ones mask at run time, and the fused kernel
that also writes that mask has two outputs, which schedule rules cannot tile.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

# Nodes never folded: random ops must stay random, control flow keeps its subgraphs.
_NEVER_FOLD = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan", "DequantizeLinear", "QuantizeLinear",
}
# A folded tensor bigger than this (128 MB of float32) stays a computation. Below it, numpy
# folds weights computed at run time (ConstantOfShape, Tile, Transpose of a constant) far
# faster than TVM's FoldConstant, which compiles a kernel for each.
_MAX_FOLDED_ELEMENTS = 1 << 25


def fold_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with shape chains folded into initializers.

    The graph inputs must already carry static shapes. Nodes that do not depend on a
    graph input's values are evaluated; the rest of the graph is left as it was.
    """
    model = shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph
    static_shapes = _static_shapes(graph)
    constants: dict[str, np.ndarray] = {
        init.name: numpy_helper.to_array(init) for init in graph.initializer
    }
    opsets = list(model.opset_import)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    folded: dict[str, np.ndarray] = {}
    rewritten = False
    consumers = Counter(name for node in graph.node for name in node.input)
    consumers.update(o.name for o in graph.output)
    for node in graph.node:
        if _fold_batch_norm(node, kept, constants, consumers, folded):
            rewritten = True
            continue
        affine = _batch_norm_as_affine(node, constants, static_shapes, folded)
        if affine:
            kept.extend(affine)
            rewritten = True
            continue
        values = _fold_node(node, constants, static_shapes, opsets)
        if values is None:
            identity = _dropout_as_identity(node, constants, read)
            rewritten |= identity is not None
            kept.append(identity or node)
            continue
        for name, value in zip([o for o in node.output if o], values, strict=True):
            constants[name] = value
            folded[name] = value
    if not folded and not rewritten:
        return model

    still_used = {name for node in kept for name in node.input}
    still_used |= {out.name for out in graph.output}
    new_inits = [init for init in graph.initializer if init.name in still_used]
    new_inits += [
        numpy_helper.from_array(np.asarray(value), name)
        for name, value in folded.items()
        if name in still_used
    ]
    dropped = {init.name for init in graph.initializer} - {init.name for init in new_inits}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    # Old exporters list initializers among the graph inputs too; drop the folded ones.
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def _fold_batch_norm(node, kept, constants, consumers, folded) -> bool:
    """Fold an inference BatchNormalization into the Conv before it, in numpy.

    W' = W * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * that + beta. The
    Conv keeps its name and takes over the batch norm's output. TVM's own folding builds a
    kernel for every constant op it folds, which costs minutes on deep networks.
    """
    factors = _batch_norm_factors(node, constants)
    if factors is None:
        return False
    x = node.input[0]
    if consumers[x] != 1:
        return False
    conv = next((k for k in reversed(kept) if x in k.output), None)
    if conv is None or conv.op_type != "Conv" or conv.input[1] not in constants:
        return False
    factor, shift = factors
    weight = constants[conv.input[1]]
    bias = constants[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else 0.0
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new_weight = (weight * factor.reshape(shape)).astype(weight.dtype)
    new_bias = (bias * factor + shift).astype(weight.dtype)
    prefix = conv.name or conv.output[0]
    folded[f"{prefix}.bn_folded_weight"] = new_weight
    folded[f"{prefix}.bn_folded_bias"] = new_bias
    constants[f"{prefix}.bn_folded_weight"] = new_weight
    constants[f"{prefix}.bn_folded_bias"] = new_bias
    del conv.input[1:]
    conv.input.extend([f"{prefix}.bn_folded_weight", f"{prefix}.bn_folded_bias"])
    conv.output[0] = node.output[0]
    return True


def _batch_norm_factors(node, constants) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of an inference BatchNormalization with constant parameters."""
    if node.op_type != "BatchNormalization" or len([o for o in node.output if o]) != 1:
        return None
    params = list(node.input[1:])
    if len(params) != 4 or any(p not in constants for p in params):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("training_mode", 0):
        return None
    gamma, beta, mean, var = (constants[p].astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
    return scale, beta - mean * scale


def _batch_norm_as_affine(node, constants, static_shapes, folded) -> list | None:
    """A batch norm not after a conv as Mul and Add by constants computed here."""
    factors = _batch_norm_factors(node, constants)
    shape = static_shapes.get(node.input[0])
    if factors is None or shape is None or len(shape) < 2:
        return None
    dtype = constants[node.input[1]].dtype
    broadcast = (-1,) + (1,) * (len(shape) - 2)
    prefix = node.name or node.output[0]
    names = (f"{prefix}.scale", f"{prefix}.shift", f"{prefix}.scaled")
    for name, value in zip(names, factors, strict=False):
        folded[name] = value.reshape(broadcast).astype(dtype)
        constants[name] = folded[name]
    return [
        helper.make_node("Mul", [node.input[0], names[0]], [names[2]], name=f"{prefix}/mul"),
        helper.make_node("Add", [names[2], names[1]], [node.output[0]], name=prefix),
    ]


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _fold_node(node, constants, static_shapes, opsets) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
        return None
    if node.op_type == "Shape":
        shape = static_shapes.get(node.input[0])
        if shape is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", None)
        return [np.array(shape[start:end], dtype=np.int64)]
    if node.op_type == "Size":
        shape = static_shapes.get(node.input[0])
        return None if shape is None else [np.array(int(np.prod(shape)), dtype=np.int64)]
    inputs = [name for name in node.input if name]
    if (not inputs and node.op_type != "Constant") or any(n not in constants for n in inputs):
        return None
    try:
        values = _evaluate(node, constants, opsets)
    except Exception:
        return None
    if any(np.asarray(v).size > _MAX_FOLDED_ELEMENTS for v in values):
        return None
    return [np.asarray(v) for v in values]


def _dropout_as_identity(node, constants, read) -> onnx.NodeProto | None:
    """An inference-mode Dropout whose mask output is unread, as an Identity; else None."""
    if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.output) > 1 and node.output[1] in read:
        return None
    training = node.input[2] if len(node.input) > 2 else ""
    if training and (training not in constants or np.asarray(constants[training]).any()):
        return None
    return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)


def _evaluate(node, constants, opsets) -> list[np.ndarray]:
    inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(constants[name].dtype), constants[name].shape
        )
        for name in node.input
        if name
    ]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    single = helper.make_model(graph, opset_imports=opsets)
    session = ReferenceEvaluator(single)
    return session.run(None, {name: constants[name] for name in node.input if name})
