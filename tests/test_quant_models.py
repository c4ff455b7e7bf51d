"""INT8 on models the digits CNN does not cover: ReLU6 (Clip), depthwise convs, residuals."""

from __future__ import annotations

import numpy as np
import onnx

import tvmq
from tvmq.models import mobilenet_v2


def test_mobilenet_v2_quantizes_and_tracks_float(tmp_path):
    path = tmp_path / "mobilenet.onnx"
    onnx.save(mobilenet_v2(image=32), path)
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(8)]
    tvmq.compile(path, quantize="int8", calibration_data=calibration).export(tmp_path / "q.tar")
    tvmq.compile(path).export(tmp_path / "f.tar")
    x = rng.random((1, 3, 32, 32), dtype=np.float32)
    (quantized,) = tvmq.runtime.load(tmp_path / "q.tar").run(input=x).values()
    (reference,) = tvmq.runtime.load(tmp_path / "f.tar").run(input=x).values()
    cosine = float(np.dot(quantized.ravel(), reference.ravel())
                   / (np.linalg.norm(quantized) * np.linalg.norm(reference)))
    assert cosine > 0.95, cosine
    # ReLU6 (ONNX Clip with constant bounds) folds into each layer's integer clamp: only the
    # classifier's output is dequantized (the float fallback was dequantize / clip /
    # quantize around every ReLU6 layer).
    kernels = tvmq.runtime.load(tmp_path / "q.tar").manifest["kernels"]
    dequantizing = [name for name in kernels if "dequantize" in name]
    assert len(dequantizing) == 1 and "matmul" in dequantizing[0], dequantizing
