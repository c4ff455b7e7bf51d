"""ChooseConvAlgorithm: pick direct, im2col+GEMM or Winograd for each convolution.

Runs on the graph after batch-norm folding and quantization and before LegalizeOps.
Integer convolutions (quantized layers) have one candidate, direct, which on CPUs is the
blocked kernel of passes/conv_blocked.py (exact; int16 pairs and vpmaddwd on AVX2, uint8
quads and vpdpbusd on AVX-512 VNNI). For
each float conv2d the candidates are the algorithms that compute it; the choice is

- ``measure``: each candidate is built on its own through the same pipeline and timed on
  this machine (kept in a cache file, so a shape is measured once per target);
- ``predict`` (the default): a rule fitted to such measurements (see ``predict``;
  ``bench/conv_algorithms.py`` checks it against measurement again);
- or a fixed algorithm for every layer.

On CPUs ``direct`` is the blocked-weight kernel (passes/conv_blocked.py) where the layer
fits it, the depthwise kernel for depthwise layers, else TVM's conv2d.

Overrides by ONNX node name (exact or glob) win over the policy. The choices go on the
module as ``tvmq.conv_algorithms`` for the artifact's manifest.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from enum import StrEnum

import numpy as np
import tvm
from tvm import relax

from tvmq.frontend import ORIGINS_ATTR

from . import conv_blocked, conv_to_gemm, winograd
from ._conv import Conv2D, IntDot

CONV_ALGORITHMS_ATTR = "tvmq.conv_algorithms"


class ConvAlgorithm(StrEnum):
    DIRECT = "direct"
    GEMM = "gemm"
    WINOGRAD2 = "winograd2"
    WINOGRAD4 = "winograd4"


class ConvPolicy(StrEnum):
    """``--conv-algorithm``: how each layer's algorithm is chosen."""

    PREDICT = "predict"
    MEASURE = "measure"
    DIRECT = "direct"
    GEMM = "gemm"
    WINOGRAD = "winograd"


def candidates(conv: Conv2D, weight_block: int | None = None,
               int_dot: IntDot = IntDot.WIDE) -> list[ConvAlgorithm]:
    result = [ConvAlgorithm.DIRECT]
    if conv.is_integer:
        # Quantized layers stay exact: the integer direct path, or the pointwise quad GEMM
        # where it applies (1x1 uint8 layers on VNNI). Winograd's transforms would round;
        # the generic GEMM measured slower than the blocked direct kernel everywhere.
        if conv_to_gemm.pointwise_quad_rows(conv, weight_block, int_dot) is not None:
            result.append(ConvAlgorithm.GEMM)
        return result
    if conv_to_gemm.eligible(conv):
        result.append(ConvAlgorithm.GEMM)
    if winograd.eligible(conv):
        result += [ConvAlgorithm.WINOGRAD2, ConvAlgorithm.WINOGRAD4]
    return result


def predict(conv: Conv2D, weight_block: int | None = None,
            int_dot: IntDot = IntDot.WIDE) -> ConvAlgorithm:
    """The rule, fitted to ResNet-50's layers measured here (bench/conv_algorithms.py):

    - uint8 1x1 layers on VNNI targets whose image splits into whole vectors of pixels
      (28, 56, 112 wide): GEMM, the quad pointwise kernel (it beat the blocked direct int8
      kernel on every such MobileNetV2 and ResNet-50 shape measured, 1.1-3.7x; numbers in
      schedules/cpu_conv.py ``PointwiseQuadConv``). Padded to whole vectors (14x14, 7x7)
      it measured 0.89-1.24x of direct (11 shapes), so those stay direct;

    - unpadded 1x1 layers whose output splits into whole vectors of pixels, on CPUs (on
      AVX-512: 28, 56 and 112 wide, not 14 or 7): GEMM, the pointwise kernel (strided: over
      the subsampled input), unless the layer reduces at least 256 input channels to 64 or
      fewer, which the blocked direct kernel runs faster. Measured here (AVX-512, 2
      threads; GEMM / direct, ms): 96->24 at 56x56 0.041 / 0.34 (24 channels do not
      block), 64->256 0.32 / 0.44, 64->64 0.075 / 0.105, 16->96 at 112x112 0.19 / 0.37,
      128->512 at 28x28 0.29 / 0.35, 192->32 0.028 / 0.038, 256->128 at 56x56 0.95 / 1.27,
      512->128 at 28x28 0.46 / 0.51, 512->256 0.93 / 1.01, 256->512 stride 2 at 56x56 1.00
      / 1.06; but 256->64 at 56x56 0.57 / 0.54. ResNet-50 end to end with those (its
      1x1 reductions to 128 and 256 and its stride-2 1x1 at 56) on GEMM: 39.8 ms against
      40.7 direct (least of 5 alternated rounds; ONNX Runtime FP32 39.5);
    - where the blocked direct kernel applies (CPU, ungrouped float32, output channels in
      blocks): direct. Measured with 2 threads on AVX2 it ran ResNet-50's 3x3 layers at
      ~140 GFLOP/s and its 1x1 layers at 60-85, where GEMM's kernels reached 11-40;
    - strided or large kernels read their input with gathers in the direct kernel: GEMM,
      unless the output is small (< 14 wide), where im2col's copy does not pay off. Where
      the blocked direct kernel applies it beat im2col + GEMM (the pointwise kernel over
      the patches) on every ResNet-50 k x k shape measured (lone layers, AVX-512, 2
      threads; direct / GEMM, ms): 3->64 7x7 s2 at 224 1.30 / 1.83, 128->128 3x3 s2 at 56
      1.17 / 1.30, 256->256 s2 at 28 1.09 / 1.42, 512->512 s2 at 14 1.46 / 2.08, 64->64
      s1 at 56 1.16 / 1.48. Where it does not (channels that do not block), GEMM ran
      16->24 3x3 s2 at 112 0.22-0.28 against 1.26-1.90 for TVM's conv2d, 3->24 at 224 0.21
      / 1.03-1.11, 40->20 5x5 s2 at 56 0.43-0.53 / 1.54-2.76;
    - 1x1: GEMM vectorizes across the whole image instead of one row; direct below 14x14;
    - Winograd F(4x4,3x3) for float 3x3 stride-1 layers with >= 16 input channels and an
      output >= 28 wide, on CPUs. Measured (tvmq/conv_measure.py, lone layers, AVX-512, 2
      threads; Winograd F(4x4) / F(2x2) / direct, ms): ResNet-50 64->64 at 56x56 0.80 /
      0.96 / 1.18, 128->128 at 28x28 0.93 / 0.80-1.28 / 1.12-1.29; VGG-19 128->128 at
      112x112 13.1 / 13.7 / 19.2, 128->256 at 56x56 4.26 / 5.94 / 9.13, 256->256 at 56x56
      11.3 / 13.2 / 17.5, 512->512 at 28x28 13.8 / 13.0 / 17.4, 64->64 at 224x224 18.5-20.6
      / 15.1-15.6 / 21.4 (``measure`` finds F(2x2) there). At 14x14 the lone layer wins
      (256->256 0.57 / 1.12) but not in a model: its transformed weight is 4x the direct
      kernel's (9.4 MB) and comes cold from memory (ResNet-50 end to end unchanged with
      them, 5% faster with the 56- and 28-wide ones). Each Winograd kernel costs 3-4 s of
      compile time;
    - otherwise direct.
    """
    if conv.is_integer:
        whole = weight_block is not None and conv_to_gemm.pointwise_image_rows(
            *conv.output_hw, weight_block // 2) is not None
        options = candidates(conv, weight_block, int_dot)
        return ConvAlgorithm.GEMM if whole and ConvAlgorithm.GEMM in options else options[0]
    out_channels, in_channels = conv.weight.shape[:2]
    if (
        conv.kernel == (1, 1) and not any(conv.padding)
        and conv_to_gemm.pointwise_rows(conv, weight_block) is not None
        and (in_channels < 256 or out_channels > 64
             or not conv_blocked.eligible(conv, weight_block))
    ):
        return ConvAlgorithm.GEMM
    oh, ow = conv.output_hw
    if (
        weight_block is not None
        and ConvAlgorithm.WINOGRAD4 in candidates(conv)
        and in_channels >= 16
        and ow >= 28
    ):
        return ConvAlgorithm.WINOGRAD4
    if conv_blocked.eligible(conv, weight_block) or not conv_to_gemm.eligible(conv):
        return ConvAlgorithm.DIRECT
    if conv.strides != (1, 1) or max(conv.kernel) >= 5:
        return ConvAlgorithm.GEMM if ow >= 14 else ConvAlgorithm.DIRECT
    if conv.kernel == (1, 1):
        return ConvAlgorithm.GEMM if oh * ow >= 196 else ConvAlgorithm.DIRECT
    return ConvAlgorithm.DIRECT


def emit(
    builder: relax.BlockBuilder, conv: Conv2D, algorithm: ConvAlgorithm,
    weight_block: int | None = None, int_dot: IntDot = IntDot.WIDE,
):
    """The rewritten call for ``algorithm``, or None to keep the conv2d.

    ``direct`` is the blocked-weight kernel where the target gives a ``weight_block`` (CPUs)
    and the convolution fits it (the depthwise kernel for depthwise ones), else the conv2d
    as it is (TVM's own direct kernel).
    """
    if algorithm is ConvAlgorithm.DIRECT:
        if conv_blocked.eligible(conv, weight_block):
            return conv_blocked.emit_blocked(builder, conv, weight_block, int_dot)
        if conv_blocked.depthwise(conv, weight_block):
            return conv_blocked.emit_depthwise(builder, conv, weight_block)
        return None
    if algorithm is ConvAlgorithm.GEMM:
        return conv_to_gemm.emit_gemm(builder, conv, weight_block, int_dot)
    if algorithm in (ConvAlgorithm.WINOGRAD2, ConvAlgorithm.WINOGRAD4):
        tile_size = 2 if algorithm is ConvAlgorithm.WINOGRAD2 else 4
        return winograd.emit_winograd(builder, conv, tile_size)
    return None


@tvm.transform.module_pass(opt_level=0, name="ChooseConvAlgorithm")
class ChooseConvAlgorithm:
    """Choose and apply each float convolution's algorithm.

    Parameters
    ----------
    policy : ConvPolicy
    overrides : mapping of ONNX node name or glob to ConvAlgorithm
    measure : callable, optional
        ``measure(conv, algorithm) -> milliseconds``; needed by the ``measure`` policy.
    weight_block : int, optional
        Output channels per weight block of the blocked direct kernel (CPU targets: two
        vector widths); None keeps direct convolutions as TVM's conv2d.
    int_dot : IntDot
        The target's integer multiply, whose operand form integer convolutions take.
    """

    def __init__(
        self, policy: ConvPolicy = ConvPolicy.PREDICT, *, overrides=None, measure=None,
        weight_block: int | None = None, int_dot: IntDot = IntDot.WIDE,
    ):
        self.policy = ConvPolicy(policy)
        self.int_dot = IntDot(int_dot)
        self.overrides = {k: ConvAlgorithm(v) for k, v in (overrides or {}).items()}
        self.measure = measure
        self.weight_block = weight_block

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        nodes = binding_nodes(main)
        records = []

        def rewrite(builder, conv: Conv2D, name: str):
            node = nodes.get(name, name)
            options = candidates(conv, self.weight_block, self.int_dot)
            predicted = (predict(conv, self.weight_block, self.int_dot) if len(options) > 1
                         else options[0])
            times = {}
            algorithm = self._override(node, options)
            if algorithm is None:
                if len(options) == 1:
                    algorithm = options[0]
                elif self.policy is ConvPolicy.MEASURE and self.measure is not None:
                    times = {a.value: self.measure(conv, a) for a in options}
                    algorithm = ConvAlgorithm(min(times, key=times.get))
                elif self.policy is ConvPolicy.PREDICT or self.policy is ConvPolicy.MEASURE:
                    algorithm = predicted
                else:
                    algorithm = self._fixed(options)
            records.append({
                "node": str(node),
                "input_shape": list(conv.data_shape),
                "weight_shape": list(conv.weight.shape),
                "strides": list(conv.strides),
                "algorithm": algorithm.value,
                "predicted": predicted.value,
                "measured_ms": times,
            })
            return emit(builder, conv, algorithm, self.weight_block, self.int_dot)

        mod = winograd.rewrite_convolutions(mod, rewrite, integer=True)
        return mod.with_attr(CONV_ALGORITHMS_ATTR, json.dumps(records))

    def _override(self, node: str, options) -> ConvAlgorithm | None:
        for pattern, algorithm in self.overrides.items():
            if fnmatch.fnmatchcase(str(node), pattern):
                if algorithm not in options:
                    from tvmq.errors import ConfigError

                    raise ConfigError(
                        f"--conv-override {pattern}={algorithm.value}: node '{node}' cannot "
                        f"use {algorithm.value}; it can use {', '.join(a.value for a in options)}"
                    )
                return algorithm
        return None

    def _fixed(self, options) -> ConvAlgorithm:
        wanted = {
            ConvPolicy.DIRECT: [ConvAlgorithm.DIRECT],
            ConvPolicy.GEMM: [ConvAlgorithm.GEMM],
            ConvPolicy.WINOGRAD: [ConvAlgorithm.WINOGRAD4, ConvAlgorithm.WINOGRAD2],
        }[self.policy]
        return next((a for a in wanted if a in options), ConvAlgorithm.DIRECT)


def binding_nodes(main: relax.Function) -> dict[str, str]:
    """Binding name -> ONNX node, renamed bindings taking the next known node's name."""
    origins = dict((main.attrs or {}).get(ORIGINS_ATTR, {}))
    names = [
        b.var.name for block in getattr(main.body, "blocks", []) for b in block.bindings
    ]
    result, following = {}, None
    for name in reversed(names):
        node = origins.get(name)
        following = str(node) if node is not None else following
        if following is not None:
            result[name] = following
    return result


class MeasurementCache:
    """Milliseconds per (target, convolution, algorithm), kept in a JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path) as handle:
                self.entries = dict(json.load(handle))
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(target: str, conv: Conv2D, algorithm: ConvAlgorithm) -> str:
        # Integer layers' kernels depend on their activations' dtype (uint8 quads, pairs).
        dtype = (str(conv.data.ty.dtype),) if conv.is_integer else ()
        return "|".join(map(str, (
            target, conv.data_shape, conv.weight.shape, conv.strides, conv.padding,
            conv.dilation, conv.groups, conv.out_dtype, algorithm.value, *dtype,
        )))

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, value: float) -> None:
        self.entries[key] = value
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=directory, suffix=".partial")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.entries, handle, indent=0)
        os.replace(partial, self.path)


def random_conv_input(conv: Conv2D) -> np.ndarray:
    return np.random.default_rng(0).random(conv.data_shape, dtype=np.float32).astype(
        str(conv.data.ty.dtype)
    )
