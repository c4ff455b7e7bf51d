"""Shared fixtures: tiny ONNX models built with onnx.helper, compiled once per session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvmq


def tiny_cnn(batch: int | str = 1) -> onnx.ModelProto:
    """conv3x3 + BN + ReLU, global average pool, flatten, Gemm: input 'x', output 'y'."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (4,)).astype(np.float32), "bn_s"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "bn_b"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "bn_m"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (4,)).astype(np.float32), "bn_v"),
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (3,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], name="bn"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def conv_relu_model(channels: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """A 3x3 padded conv (channels -> channels) and a ReLU on a size x size image, input
    "x", output "y": one Winograd kernel in a default CPU build when >= 28 wide."""
    weight = np.random.default_rng(seed).normal(0, 0.2, (channels, channels, 3, 3))
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny_cnn.onnx"
    onnx.save(tiny_cnn(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_path, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("artifacts") / "tiny.tar"
    tvmq.compile(tiny_model_path, target="x86").export(path)
    return str(path)
