"""Whole models through tvmq against ONNX Runtime: the light model zoo, the random-weight
reference models of ``tvmq.models``, and the CLI on a few of them.

Untuned x86 code is slow (resnet50 and vgg19 take seconds per run), so each test compiles
and runs its model exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import reference, relative_error

import tvmq
from tvmq import models
from tvmq.frontend import graph_inputs
from tvmq.onnx_fold import fold_static_shapes

TOLERANCE = 1e-4
LIGHT_ZOO = models.light_zoo_models()
DIGITS = os.path.join(os.path.dirname(tvmq.__file__), "examples", "digits.onnx")


def _random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in graph_inputs(model)
    }


def _with_logits_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """Also output the input of a final Softmax.

    The light zoo's weights are constants, so every class gets the same logit and the
    softmax is exactly uniform whatever the network computed; the logits themselves still
    depend on every layer.
    """
    last = model.graph.node[-1]
    if last.op_type != "Softmax":
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    (info,) = [v for v in inferred.graph.value_info if v.name == last.input[0]]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(info)
    return model


def _assert_matches_onnxruntime(model: onnx.ModelProto, path, tmp_path, *, cli_run=False):
    """Compile ``path`` (a file holding ``model``) for x86, run it, compare every output;
    with ``cli_run`` the same artifact also runs through ``tvmq run`` and is compared."""
    artifact = tmp_path / "model.tar"
    tvmq.compile(str(path), target="x86").export(artifact)
    compiled = tvmq.runtime.load(artifact)
    inputs = _random_inputs(model)
    runs = [compiled.run(**inputs)]
    if cli_run:
        np.savez(tmp_path / "in.npz", **inputs)
        subprocess.run(
            [sys.executable, "-m", "tvmq", "run", str(artifact), "--inputs",
             str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz")],
            check=True, capture_output=True, timeout=600,
        )
        with np.load(tmp_path / "out.npz") as data:
            runs.append({name: data[name] for name in data.files})
    names = [o.name for o in model.graph.output]
    for actual in runs:
        assert list(actual) == names
        for name, expected in zip(names, reference(model, inputs), strict=True):
            assert actual[name].shape == expected.shape, name
            error = relative_error(actual[name], expected)
            assert error <= TOLERANCE, f"output '{name}': relative error {error:.2e}"


def test_light_zoo_is_there():
    assert len(LIGHT_ZOO) == 9, sorted(LIGHT_ZOO)


@pytest.mark.parametrize("name", sorted(LIGHT_ZOO))
def test_light_zoo_matches_onnxruntime(name, tmp_path):
    model = _with_logits_output(onnx.load(LIGHT_ZOO[name]))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    _assert_matches_onnxruntime(model, path, tmp_path, cli_run=True)


REFERENCE_MODELS = {
    "resnet18": lambda: models.resnet18(batch=1, image=64),
    "mobilenet_v2": lambda: models.mobilenet_v2(batch=1, image=64),
    "bert_encoder_layer": lambda: models.bert_encoder_layer(
        batch=1, seq=32, hidden=128, heads=4, ffn=256
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_matches_onnxruntime(name, tmp_path):
    model = REFERENCE_MODELS[name]()
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    _assert_matches_onnxruntime(model, path, tmp_path)


def test_reference_models_are_deterministic():
    first = models.bert_encoder_layer(seq=8, hidden=32, heads=2, ffn=64)
    second = models.bert_encoder_layer(seq=8, hidden=32, heads=2, ffn=64)
    assert first.SerializeToString() == second.SerializeToString()
    other_seed = models.bert_encoder_layer(seq=8, hidden=32, heads=2, ffn=64, seed=1)
    assert first.SerializeToString() != other_seed.SerializeToString()


def test_reference_models_keep_batch_norm_and_names():
    model = models.resnet18(image=32)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 20
    assert "layer1.0.conv1" in {n.name for n in model.graph.node}
    depthwise = [
        n for n in models.mobilenet_v2(image=32).graph.node
        if any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(depthwise) == 17


def test_bert_layer_rejects_indivisible_heads():
    with pytest.raises(tvmq.TvmqError, match="divisible by heads"):
        models.bert_encoder_layer(hidden=100, heads=12)


def _cli_cases() -> list:
    cases = [
        pytest.param(lambda: onnx.load(LIGHT_ZOO["squeezenet"]), id="squeezenet"),
        pytest.param(REFERENCE_MODELS["resnet18"], id="resnet18"),
    ]
    if os.path.exists(DIGITS):
        cases.append(pytest.param(lambda: onnx.load(DIGITS), id="digits"))
    return cases


@pytest.mark.parametrize("build", _cli_cases())
def test_cli_compile_run_matches_onnxruntime(build, tmp_path):
    model = build()
    path, artifact = tmp_path / "model.onnx", tmp_path / "model.tar"
    onnx.save(model, path)
    inputs = _random_inputs(model, seed=1)
    np.savez(tmp_path / "in.npz", **inputs)
    for args in (
        ["compile", str(path), "--target", "x86", "-o", str(artifact)],
        ["run", str(artifact), "--inputs", str(tmp_path / "in.npz"),
         "--outputs", str(tmp_path / "out.npz")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tvmq", *args], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as outputs:
        for value, expected in zip(
            (outputs[o.name] for o in model.graph.output), reference(model, inputs), strict=True
        ):
            assert relative_error(value, expected) <= TOLERANCE


def _dropout_model(*, read_mask: bool = False, training: bool = False) -> onnx.ModelProto:
    inputs = ["x", "ratio", "training"] if training else ["x", "ratio"]
    outputs = ["y", "mask"] if read_mask else ["y"]
    nodes = [
        onnx.helper.make_node("Dropout", inputs, ["d", "mask"], name="dropout"),
        onnx.helper.make_node("Relu", ["d"], ["y"], name="relu"),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        onnx.numpy_helper.from_array(np.array(True), "training"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "dropout",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info(name, dtype, [2, 3])
         for name, dtype in zip(outputs, (onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL))],
        inits[: len(inputs) - 1],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_inference_dropout_becomes_identity():
    ops = [n.op_type for n in fold_static_shapes(_dropout_model()).graph.node]
    assert ops == ["Identity", "Relu"]
    for kept in (_dropout_model(read_mask=True), _dropout_model(training=True)):
        assert [n.op_type for n in fold_static_shapes(kept).graph.node] == ["Dropout", "Relu"]
