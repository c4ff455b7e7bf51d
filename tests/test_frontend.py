"""tvmq.load: import, static shapes, shape-chain folding and its one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from conftest import reference, relative_error, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import tvmq
from tvmq.errors import InputError, ModelError, UnsupportedOpError


def test_load_gives_static_relax_module(tiny_model_path):
    mod = tvmq.load(tiny_model_path)
    assert isinstance(mod, tvm.IRModule)
    (param,) = mod["main"].params
    assert [int(d) for d in param.ty.shape.values] == [1, 1, 8, 8]
    assert list(mod["main"].attrs["tvmq.input_names"]) == ["x"]


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match=r"model file '.*nope.onnx' does not exist"):
        tvmq.load(tmp_path / "nope.onnx")


def test_not_an_onnx_model(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    with pytest.raises(ModelError, match=r"is not an ONNX model"):
        tvmq.load(path)


def test_unsupported_ops_listed_with_first_node(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy_1", domain=""),
        helper.make_node("FancyOp", ["b"], ["c"], name="fancy_2", domain=""),
        helper.make_node("OtherOp", ["c"], ["y"], name="other_1", domain=""),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedOpError) as info:
        tvmq.load(path)
    message = str(info.value)
    assert "FancyOp (first at node 'fancy_1')" in message
    assert "OtherOp (first at node 'other_1')" in message
    assert "\n" not in message


def test_unknown_input_name(tiny_model_path):
    with pytest.raises(InputError, match=r"input_shapes names 'images' but the inputs .* are: x"):
        tvmq.load(tiny_model_path, input_shapes={"images": (1, 1, 8, 8)})


def test_symbolic_dim_needs_input_shapes(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(tiny_cnn(batch="N"), path)
    with pytest.raises(InputError, match=r"input 'x' .* symbolic dimension \('N'\) at axis 0"):
        tvmq.load(path)
    mod = tvmq.load(path, input_shapes={"x": (2, 1, 8, 8)})
    assert [int(d) for d in mod["main"].params[0].ty.shape.values] == [2, 1, 8, 8]


def test_input_shapes_rank_mismatch(tiny_model_path):
    with pytest.raises(InputError, match=r"input 'x' has rank 4 but input_shapes gives"):
        tvmq.load(tiny_model_path, input_shapes={"x": (1, 64)})


def _shape_chain_model() -> onnx.ModelProto:
    """Flatten written the way exporters write it: Shape -> Gather/Slice -> Concat -> Reshape,
    plus ConstantOfShape fed by a scalar-derived shape."""
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"], name="slice"),
        helper.make_node("Concat", ["batch", "minus_one"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"], name="reshape"),
        helper.make_node("Shape", ["flat"], ["flat_shape"], name="flat_shape"),
        helper.make_node("ConstantOfShape", ["flat_shape"], ["ones"], name="ones",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["flat", "ones"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_shape_chains_fold_and_compile(tmp_path):
    model = _shape_chain_model()
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    mod = tvmq.load(path, input_shapes={"x": (2, 3, 4)})
    text = mod.script()
    assert "shape_of" not in text
    artifact = tvmq.compile(mod, target="x86")
    artifact.export(tmp_path / "chain.tar")
    x = np.random.default_rng(0).random((2, 3, 4), dtype=np.float32)
    (y,) = tvmq.runtime.load(tmp_path / "chain.tar").run(x=x).values()
    (expected,) = reference(model, {"x": x})
    assert relative_error(y, expected) <= 1e-6


def _shared_weight_residual_model() -> onnx.ModelProto:
    """Two convs sharing one weight initializer, summed by an ONNX Sum, then a Max."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["b", "x", "x"], ["s"], name="residual"),
        helper.make_node("Max", ["s", "x"], ["y"], name="max"),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_sum_and_max_of_tensors_import_as_binary_ops(tmp_path):
    model = _shared_weight_residual_model()
    path = tmp_path / "sum.onnx"
    onnx.save(model, path)
    text = tvmq.load(path).script()
    assert "R.stack" not in text and "R.sum" not in text
    assert text.count("R.add(") == 2 and "R.maximum(" in text
    artifact = tvmq.compile(path, target="x86")
    artifact.export(tmp_path / "sum.tar")
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    (y,) = tvmq.runtime.load(tmp_path / "sum.tar").run(x=x).values()
    (expected,) = reference(model, {"x": x})
    assert relative_error(y, expected) <= 1e-5


def _clip_model(bounds: list, opset: int, attrs: dict | None = None) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(v, np.float32), f"b{i}")
             for i, v in enumerate(bounds) if v is not None]
    inputs = ["x"] + [f"b{i}" if v is not None else "" for i, v in enumerate(bounds)]
    graph = helper.make_graph(
        [helper.make_node("Clip", inputs, ["y"], **(attrs or {}))], "clip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("bounds, opset, attrs, want", [
    ([0.0, 6.0], 13, None, (0.0, 6.0)),             # ReLU6
    ([None, 2.5], 13, None, (-np.inf, 2.5)),        # no lower bound
    ([np.nan, 1.0], 13, None, (-np.inf, 1.0)),      # NaN bound: unbounded, as in ONNX
    ([], 6, {"min": -1.0, "max": 1.0}, (-1.0, 1.0)),  # attribute bounds before opset 11
])
def test_constant_clip_imports_as_one_clip(bounds, opset, attrs, want, tmp_path):
    mod = tvmq.frontend.import_onnx(_clip_model(bounds, opset, attrs))
    (call,) = [b.value for b in mod["main"].body.blocks[0].bindings
               if isinstance(b.value, tvm.relax.Call)]
    assert call.op.name == "relax.clip"
    got = tuple(float(getattr(a.value, "value", a.value)) for a in call.args[1:])
    assert got == want
    x = np.array([[-9.0, -0.5, 2.0, 9.0]], np.float32)
    tvmq.compile(mod).export(tmp_path / "clip.tar")
    (out,) = tvmq.runtime.load(tmp_path / "clip.tar").run(x=x).values()
    np.testing.assert_array_equal(out, np.clip(x, *want))


def test_clip_with_a_computed_bound_keeps_tvm_import():
    model = _clip_model([0.0], 13)
    node = model.graph.node[0]
    node.input[:] = ["x", "x"]  # the lower bound is a tensor, not a constant
    del model.graph.initializer[:]
    mod = tvmq.frontend.import_onnx(model)
    assert "R.clip" not in mod["main"].script()
