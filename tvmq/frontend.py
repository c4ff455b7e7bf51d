"""ONNX frontend: a model file in, a Relax IRModule with static shapes and weights out.

The flow is: read and check the file, fix the input shapes (a symbolic dimension needs a
value from the user), fold the shape computations that the Relax importer cannot take,
check that every operator has a converter, then import with the weights as constants.
The ONNX names of the inputs and outputs travel on ``main`` as function attributes, so
the build can write them into the artifact's manifest.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from .errors import InputError, ModelError, UnsupportedOpError
from .onnx_fold import fold_static_shapes

INPUT_NAMES_ATTR = "tvmq.input_names"
OUTPUT_NAMES_ATTR = "tvmq.output_names"
# Bound variable name -> the ONNX node it was imported from (for per-kernel reports).
ORIGINS_ATTR = "tvmq.origins"


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping) -> TensorInfo:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


def load(
    path: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tvm.IRModule:
    """Import an ONNX model into a Relax IRModule with static shapes.

    Parameters
    ----------
    path : str or PathLike
        The ``.onnx`` file.
    input_shapes : mapping of input name to shape, optional
        Shapes for inputs whose ONNX shape has symbolic or unknown dimensions; a given
        shape also overrides a static one.

    Returns
    -------
    mod : tvm.IRModule
        The model, its weights bound as constants in ``main``.
    """
    model = read_onnx(path)
    return import_onnx(model, input_shapes, source=str(path))


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, with one-line errors for a missing or malformed file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"model file '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise ModelError(f"model path '{path}' is a directory; pass the .onnx file inside it")
    try:
        model = onnx.load(path)
    except Exception as err:
        raise ModelError(
            f"'{path}' is not an ONNX model ({type(err).__name__}); pass a .onnx file"
        ) from None
    if not model.graph.node:
        raise ModelError(f"'{path}' is not an ONNX model (it has no graph); pass a .onnx file")
    return model


def import_onnx(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    source: str = "model",
) -> tvm.IRModule:
    """Import an in-memory ONNX model; see :func:`load`."""
    model = _with_static_inputs(model, dict(input_shapes or {}), source)
    model = fold_static_shapes(model)
    _check_supported(model, source)
    inputs = graph_inputs(model)
    importer = _NamingImporter(
        {i.name: list(i.shape) for i in inputs},
        {i.name: i.dtype for i in inputs},
        keep_params_in_input=False,
        sanitize=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importer.from_onnx(model.graph, _opset(model))
        except Exception as err:
            message = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            raise ModelError(
                f"the Relax ONNX importer failed on '{source}': {type(err).__name__}: "
                f"{message[:300]}"
            ) from None
    main = mod["main"].with_attr(INPUT_NAMES_ATTR, [i.name for i in inputs])
    main = main.with_attr(OUTPUT_NAMES_ATTR, [o.name for o in model.graph.output])
    main = main.with_attr(ORIGINS_ATTR, _origins(importer.node_of_var, main))
    mod["main"] = main
    return mod


def _opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 1


def _origins(node_of_var: dict[str, str], main) -> dict[str, str]:
    """Which ONNX node each bound variable of ``main`` comes from, by variable name."""
    # Only the names given after nodes: helper names (lv, lv1, ...) are reused by rewrites.
    names = {b.var.name for block in main.body.blocks for b in block.bindings}
    return {name: node for name, node in node_of_var.items() if name in names}


class _NamingImporter(ONNXGraphImporter):
    """The Relax ONNX importer, binding each node's result to a variable named after it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node_of_var: dict[str, str] = {}

    def _convert_operator(self, op_name, inputs, attrs, opset):
        pairwise = _PAIRWISE.get(op_name)
        if pairwise is not None and len(inputs) > 1 and not all(
            isinstance(i, tvm.ir.GenericConst) for i in inputs
        ):
            # Sum/Max/Min of tensors as a chain of binary ops (the same values under ONNX's
            # broadcasting): TVM's importer stacks broadcast copies and reduces them, which
            # costs a kernel and copies per residual add and keeps it out of fusion and
            # out of the integer quantizer.
            result = functools.reduce(
                lambda lhs, rhs: self.bb.normalize(pairwise(lhs, rhs)), inputs
            )
        elif op_name == "Clip" and (bounds := _clip_bounds(inputs, attrs, opset)) is not None:
            # One relax.clip where the bounds are constants: TVM's importer emits maximum
            # and minimum kernels, which the quantizer cannot fold into a layer's clamp
            # (MobileNetV2's ReLU6 layers then requantized through float32).
            result = relax.op.clip(inputs[0], *bounds)
        else:
            result = super()._convert_operator(op_name, inputs, attrs, opset)
        node_name = str(attrs.get("tvm_custom", {}).get("name") or op_name)
        if isinstance(result, relax.Call | relax.TupleGetItem):
            result = self.bb.emit(result, name_hint=_var_name(node_name))
        if isinstance(result, relax.Var):
            self.node_of_var.setdefault(result.name, node_name)
        return result


_PAIRWISE = {"Sum": relax.op.add, "Max": relax.op.maximum, "Min": relax.op.minimum}


def _clip_bounds(inputs, attrs, opset: int) -> tuple[float, float] | None:
    """(low, high) of a float Clip whose bounds are constants (missing: infinite), or None."""
    from .passes._qdq import scalar  # the passes import this module: not at module level

    data = inputs[0]
    if not isinstance(getattr(data, "ty", None), relax.TensorType) or not str(
        data.ty.dtype
    ).startswith("float"):
        return None
    if opset < 11:
        return float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
    bounds = []
    for index, missing in ((1, -np.inf), (2, np.inf)):
        bound = inputs[index] if index < len(inputs) else None
        value = missing if bound is None else scalar(bound)
        if value is None:
            return None
        bounds.append(missing if np.isnan(value) else float(value))
    return bounds[0], bounds[1]


def _var_name(node_name: str) -> str:
    name = re.sub(r"\W+", "_", node_name).strip("_") or "node"
    return name if not name[0].isdigit() else f"n_{name}"


def graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        result.append(TensorInfo(value.name, dims, dtype))
    return result


def _with_static_inputs(model, input_shapes: dict, source: str) -> onnx.ModelProto:
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    for name in input_shapes:
        if name not in names:
            raise InputError(
                f"input_shapes names '{name}' but the inputs of '{source}' are: "
                f"{', '.join(names)}"
            )
    model = onnx.ModelProto.FromString(model.SerializeToString())
    by_name = {v.name: v for v in model.graph.input}
    for info in inputs:
        shape = input_shapes.get(info.name)
        if shape is None:
            _require_static(model, by_name[info.name], source)
            continue
        shape = tuple(int(d) for d in shape)
        if any(d <= 0 for d in shape):
            raise InputError(f"input '{info.name}' shape {shape} must have positive dimensions")
        if len(info.shape) and len(shape) != len(info.shape):
            raise InputError(
                f"input '{info.name}' has rank {len(info.shape)} but input_shapes gives "
                f"{shape}; give {len(info.shape)} dimensions"
            )
        dims = by_name[info.name].type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = d
    return model


def _require_static(model, value, source: str) -> None:
    tensor_type = value.type.tensor_type
    hint = f"pass input_shapes (CLI: --input-shapes {value.name}:1x3x224x224)"
    if not tensor_type.HasField("shape"):
        raise InputError(f"input '{value.name}' of '{source}' has unknown rank; {hint}")
    for axis, dim in enumerate(tensor_type.shape.dim):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            label = f" ('{dim.dim_param}')" if dim.dim_param else ""
            raise InputError(
                f"input '{value.name}' of '{source}' has a symbolic dimension{label} at axis "
                f"{axis}; {hint}"
            )


def _check_supported(model: onnx.ModelProto, source: str) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    first_node: dict[str, str] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in known and node.op_type not in first_node:
            first_node[node.op_type] = node.name or f"#{index}"
    if first_node:
        listed = ", ".join(f"{op} (first at node '{name}')" for op, name in first_node.items())
        raise UnsupportedOpError(
            f"'{source}' uses operators the Relax ONNX importer does not support: {listed}; "
            "replace them in the exported model or file an issue"
        )


def random_inputs(inputs: Sequence[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for ``inputs``: uniform [0, 1) floats, small non-negative integers."""
    rng = np.random.default_rng(seed)
    result = {}
    for info in inputs:
        if np.dtype(info.dtype).kind == "f":
            result[info.name] = rng.random(info.shape, dtype=np.float32).astype(info.dtype)
        elif np.dtype(info.dtype).kind == "b":
            result[info.name] = rng.integers(0, 2, info.shape).astype(info.dtype)
        else:
            result[info.name] = rng.integers(0, 4, info.shape).astype(info.dtype)
    return result
