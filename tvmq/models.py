"""Reference ONNX models with deterministic random weights, built with ``onnx.helper``.

Tests compare tvmq against ONNX Runtime on these, and benchmarks time them. The weights
are drawn from ``numpy.random.default_rng(seed)`` with He-style scales, so activations stay
of order one through the network, and every BatchNormalization has a non-trivial mean,
variance, scale and bias, so folding it into the convolution before it changes numbers.
All input shapes are static.

``light_zoo_models`` lists the small ONNX model-zoo graphs that ship inside the ``onnx``
wheel (constant weights; good for operator coverage, not for numerics).
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConfigError

OPSET = 17
# The newest IR version every ONNX Runtime since 1.15 reads.
IR_VERSION = 9

# MobileNetV2 (width 1.0): expansion t, output channels c, repeats n, first stride s.
_MOBILENET_V2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class _GraphBuilder:
    """Accumulates nodes and initializers; every op method returns its output's name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def weight(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def constant(self, value, dtype=np.float32) -> str:
        """A shared initializer for a small constant (a scalar, a shape)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"const_{len(self._constants)}", array)
        return self._constants[key]

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def he_normal(self, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(gain / fan_in)).astype(np.float32)

    def conv(
        self, name: str, x: str, cin: int, cout: int, kernel: int, *,
        stride: int = 1, group: int = 1, gain: float = 2.0,
    ) -> str:
        """A bias-free convolution with "same" padding (a BatchNormalization follows)."""
        shape = (cout, cin // group, kernel, kernel)
        w = self.weight(f"{name}.weight", self.he_normal(shape, shape[1] * kernel * kernel, gain))
        pad = kernel // 2
        return self.node(
            "Conv", name, [x, w], kernel_shape=[kernel, kernel], strides=[stride, stride],
            pads=[pad] * 4, group=group,
        )

    def batch_norm(self, name: str, x: str, channels: int, *, gamma: float = 1.0) -> str:
        """Inference BatchNormalization with random statistics; ``gamma`` scales its scale."""
        rng = self.rng
        scale = gamma * rng.uniform(0.5, 1.5, channels)
        bias = 0.1 * rng.standard_normal(channels)
        mean = 0.1 * rng.standard_normal(channels)
        var = rng.uniform(0.5, 1.5, channels)
        params = [
            self.weight(f"{name}.{part}", value.astype(np.float32))
            for part, value in (("weight", scale), ("bias", bias),
                                ("running_mean", mean), ("running_var", var))
        ]
        return self.node("BatchNormalization", name, [x, *params], epsilon=1e-5)

    def linear(self, name: str, x: str, fan_in: int, fan_out: int, *, gain: float = 1.0) -> str:
        """``x @ W + b`` as MatMul and Add, the way exporters write a Linear on 3-D inputs."""
        w = self.weight(f"{name}.weight", self.he_normal((fan_in, fan_out), fan_in, gain))
        b = self.weight(f"{name}.bias", 0.1 * self.rng.standard_normal(fan_out).astype(np.float32))
        y = self.node("MatMul", f"{name}.matmul", [x, w])
        return self.node("Add", name, [y, b])

    def classifier(self, name: str, x: str, features: int, classes: int) -> str:
        """GlobalAveragePool, Flatten and a Gemm whose output is the graph's "logits"."""
        pooled = self.node("GlobalAveragePool", "avgpool", [x])
        flat = self.node("Flatten", "flatten", [pooled], axis=1)
        w = self.weight(f"{name}.weight", self.he_normal((classes, features), features, 1.0))
        b = self.weight(f"{name}.bias", 0.1 * self.rng.standard_normal(classes).astype(np.float32))
        self.nodes.append(
            helper.make_node("Gemm", [flat, w, b], ["logits"], name=name, transB=1)
        )
        return "logits"

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvmq.models"
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def resnet18(batch: int = 1, image: int = 224, *, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 for ImageNet with random weights and BatchNormalization left unfolded.

    Parameters
    ----------
    batch, image : int
        The static input shape is ``(batch, 3, image, image)``; ``image`` should be a
        multiple of 32.
    seed : int
        Seed of the weights.

    Returns
    -------
    onnx.ModelProto
        Input ``"input"`` (float32), output ``"logits"`` of shape ``(batch, 1000)``.
    """
    g = _GraphBuilder(seed)
    x = g.conv("conv1", "input", 3, 64, 7, stride=2)
    x = g.node("Relu", "relu", [g.batch_norm("bn1", x, 64)])
    x = g.node("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(g, f"layer{stage}.{block}", x, cin, cout, stride)
            cin = cout
    g.classifier("fc", x, 512, 1000)
    return g.model(
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])],
    )


def _basic_block(g: _GraphBuilder, name: str, x: str, cin: int, cout: int, stride: int) -> str:
    y = g.conv(f"{name}.conv1", x, cin, cout, 3, stride=stride)
    y = g.node("Relu", f"{name}.relu1", [g.batch_norm(f"{name}.bn1", y, cout)])
    y = g.conv(f"{name}.conv2", y, cout, cout, 3)
    # A small last scale in each residual branch keeps the sum from doubling the variance
    # block after block (the "zero-init residual" trick, not quite zero).
    y = g.batch_norm(f"{name}.bn2", y, cout, gamma=0.3)
    if stride != 1 or cin != cout:
        x = g.conv(f"{name}.downsample.0", x, cin, cout, 1, stride=stride, gain=1.0)
        x = g.batch_norm(f"{name}.downsample.1", x, cout)
    y = g.node("Add", f"{name}.add", [y, x])
    return g.node("Relu", f"{name}.relu2", [y])


def mobilenet_v2(batch: int = 1, image: int = 224, *, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0) with random weights and BatchNormalization left unfolded.

    Inverted residual blocks: a 1x1 expansion, a depthwise 3x3 convolution (``group`` equal
    to its channels) and a linear 1x1 projection, with ReLU6 written as ``Clip(0, 6)`` and
    a residual Add where the stride is 1 and the channel counts agree.

    Parameters
    ----------
    batch, image : int
        The static input shape is ``(batch, 3, image, image)``; ``image`` should be a
        multiple of 32.
    seed : int
        Seed of the weights.

    Returns
    -------
    onnx.ModelProto
        Input ``"input"`` (float32), output ``"logits"`` of shape ``(batch, 1000)``.
    """
    g = _GraphBuilder(seed)
    x = _conv_bn_relu6(g, "features.0", "input", 3, 32, 3, stride=2)
    cin, index = 32, 1
    for expand, cout, repeats, first_stride in _MOBILENET_V2_BLOCKS:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            x = _inverted_residual(g, f"features.{index}", x, cin, cout, stride, expand)
            cin, index = cout, index + 1
    x = _conv_bn_relu6(g, f"features.{index}", x, cin, 1280, 1)
    g.classifier("classifier", x, 1280, 1000)
    return g.model(
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])],
    )


def _conv_bn_relu6(
    g: _GraphBuilder, name: str, x: str, cin: int, cout: int, kernel: int, *,
    stride: int = 1, group: int = 1,
) -> str:
    y = g.conv(f"{name}.conv", x, cin, cout, kernel, stride=stride, group=group)
    y = g.batch_norm(f"{name}.bn", y, cout)
    return g.node("Clip", f"{name}.relu6", [y, g.constant(0.0), g.constant(6.0)])


def _inverted_residual(
    g: _GraphBuilder, name: str, x: str, cin: int, cout: int, stride: int, expand: int
) -> str:
    hidden = cin * expand
    y = x
    if expand != 1:
        y = _conv_bn_relu6(g, f"{name}.expand", y, cin, hidden, 1)
    y = _conv_bn_relu6(g, f"{name}.depthwise", y, hidden, hidden, 3, stride=stride, group=hidden)
    # The projection is linear (no activation): gain 1 instead of He's 2.
    y = g.conv(f"{name}.project.conv", y, hidden, cout, 1, gain=1.0)
    if stride == 1 and cin == cout:
        y = g.batch_norm(f"{name}.project.bn", y, cout, gamma=0.3)
        return g.node("Add", f"{name}.add", [x, y])
    return g.batch_norm(f"{name}.project.bn", y, cout)


def bert_encoder_layer(
    batch: int = 1,
    seq: int = 128,
    hidden: int = 768,
    heads: int = 12,
    ffn: int = 3072,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """One BERT encoder layer (post-norm) with random weights, as exporters write it.

    Self-attention from MatMul+Add projections, Reshape/Transpose into heads, scaled
    ``Softmax(Q K^T / sqrt(d)) V`` and an output projection; residual Add and
    LayerNormalization; a feed-forward block with the erf form of GELU
    (``x * 0.5 * (1 + erf(x / sqrt(2)))``, since the Gelu op needs opset 20); residual Add
    and LayerNormalization. No attention mask.

    Parameters
    ----------
    batch, seq, hidden, heads, ffn : int
        Shapes; ``hidden`` must be divisible by ``heads``.
    seed : int
        Seed of the weights.

    Returns
    -------
    onnx.ModelProto
        Input ``"hidden_states"`` and output ``"output"``, both float32 of shape
        ``(batch, seq, hidden)``.
    """
    if hidden % heads:
        raise ConfigError(f"hidden ({hidden}) must be divisible by heads ({heads}); change one")
    head_dim = hidden // heads
    g = _GraphBuilder(seed)
    x = "hidden_states"
    split = g.constant([batch, seq, heads, head_dim], np.int64)
    merge = g.constant([batch, seq, hidden], np.int64)

    def to_heads(name: str, perm: list[int]) -> str:
        projected = g.linear(f"attention.{name}", x, hidden, hidden)
        y = g.node("Reshape", f"attention.{name}.reshape", [projected, split])
        return g.node("Transpose", f"attention.{name}.transpose", [y], perm=perm)

    q = to_heads("query", [0, 2, 1, 3])  # (batch, heads, seq, head_dim)
    k = to_heads("key", [0, 2, 3, 1])  # (batch, heads, head_dim, seq)
    v = to_heads("value", [0, 2, 1, 3])
    scores = g.node("MatMul", "attention.scores", [q, k])
    scores = g.node("Div", "attention.scale", [scores, g.constant(math.sqrt(head_dim))])
    probs = g.node("Softmax", "attention.softmax", [scores], axis=-1)
    context = g.node("MatMul", "attention.context", [probs, v])
    context = g.node("Transpose", "attention.context.transpose", [context], perm=[0, 2, 1, 3])
    context = g.node("Reshape", "attention.context.reshape", [context, merge])
    attended = g.linear("attention.output.dense", context, hidden, hidden)
    y = g.node("Add", "attention.output.residual", [attended, x])
    y = _layer_norm(g, "attention.output.LayerNorm", y, hidden)

    inner = g.linear("intermediate.dense", y, hidden, ffn, gain=2.0)
    erf = g.node("Erf", "intermediate.gelu.erf",
                 [g.node("Div", "intermediate.gelu.div", [inner, g.constant(math.sqrt(2.0))])])
    erf = g.node("Add", "intermediate.gelu.add", [erf, g.constant(1.0)])
    gelu = g.node("Mul", "intermediate.gelu.mul", [inner, erf])
    gelu = g.node("Mul", "intermediate.gelu", [gelu, g.constant(0.5)])
    out = g.linear("output.dense", gelu, ffn, hidden)
    out = g.node("Add", "output.residual", [out, y])
    out = _layer_norm(g, "output.LayerNorm", out, hidden, output="output")
    shape = [batch, seq, hidden]
    return g.model(
        "bert_encoder_layer",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
    )


def _layer_norm(g: _GraphBuilder, name: str, x: str, hidden: int, output: str = "") -> str:
    scale = g.weight(f"{name}.weight", (1 + 0.1 * g.rng.standard_normal(hidden)).astype("f4"))
    bias = g.weight(f"{name}.bias", (0.1 * g.rng.standard_normal(hidden)).astype("f4"))
    g.nodes.append(helper.make_node(
        "LayerNormalization", [x, scale, bias], [output or name], name=name,
        axis=-1, epsilon=1e-12,
    ))
    return output or name


def light_zoo_models() -> dict[str, str]:
    """The light model-zoo graphs bundled with the ``onnx`` wheel, by name, sorted.

    The name is the file name without its ``light_`` prefix and ``.onnx`` suffix
    (``"bvlc_alexnet"``, ``"resnet50"``...). Their weights are constants, so outputs can be
    degenerate; they cover operators, not numerics.
    """
    directory = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    if not os.path.isdir(directory):
        return {}
    models = {}
    for filename in sorted(os.listdir(directory)):
        if filename.endswith(".onnx"):
            name = filename.removesuffix(".onnx").removeprefix("light_")
            models[name] = os.path.join(directory, filename)
    return models
