"""``make demo``: compile the bundled digits CNN for this CPU, run it, say what it did.

Builds it twice, FP32 and INT8 (integer-only, calibrated on 200 held-out digits), and
prints for each: top-1 accuracy on the 1,000 held-out test digits, median latency (batch
1), and artifact size, beside ONNX Runtime's FP32 latency measured in the same run.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import tvmq
from tvmq.examples import DIGITS_CALIBRATION, DIGITS_MODEL, digits_test_set


def accuracy(model: tvmq.runtime.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy, one image per run (the artifact is built for batch 1)."""
    name = model.inputs[0].name
    hits = 0
    for image, label in zip(images, labels, strict=True):
        (logits,) = model.run(**{name: image[None]}).values()
        hits += int(np.argmax(logits) == label)
    return hits / len(labels)


def onnxruntime_latency_ms(model, feed: dict, repeat: int = 200) -> float | None:
    """Median latency of ONNX Runtime (CPU) on a model file or an open InferenceSession,
    or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = model if isinstance(model, ort.InferenceSession) else ort.InferenceSession(
        model, providers=["CPUExecutionProvider"])
    for _ in range(min(20, repeat)):
        session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    images, labels = digits_test_set()
    builds = [
        ("FP32", {}),
        ("INT8", {"quantize": "int8", "calibration_data": DIGITS_CALIBRATION}),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvmq-demo-") as work:
        for label, options in builds:
            path = os.path.join(work, f"digits-{label.lower()}.tar")
            start = time.perf_counter()
            tvmq.compile(DIGITS_MODEL, target="x86", **options).export(path)
            compile_s = time.perf_counter() - start
            model = tvmq.runtime.load(path)
            acc = accuracy(model, images, labels)
            feed = {model.inputs[0].name: images[:1]}
            bench = model.benchmark(repeat=20, number=10, inputs=feed)
            rows.append((label, acc, bench.median_ms, os.path.getsize(path), compile_s))
    ort_ms = onnxruntime_latency_ms(DIGITS_MODEL, {"input": images[:1]})

    preset = tvmq.targets.resolve("x86")
    print(f"tvmq {tvmq.__version__} demo: bundled digits CNN on {preset.description}")
    header = ("build", "top-1", "latency", "vs ORT", "artifact", "compile")
    print("{:<8} {:>7} {:>11} {:>7} {:>10} {:>8}".format(*header))
    for label, acc, ms, size, compile_s in rows:
        ratio = f"{ort_ms / ms:.2f}x" if ort_ms else "-"
        print(
            f"{label:<8} {acc * 100:6.1f}% {ms:8.3f} ms {ratio:>7} {size / 1e3:7.0f} kB "
            f"{compile_s:6.1f} s"
        )
    if ort_ms:
        print(f"ONNX Runtime FP32: {ort_ms:.3f} ms median, same machine, same run "
              "('vs ORT' > 1 means tvmq is faster)")
    print(f"held-out images: {len(labels)}; latency: batch 1, median of 20 x 10 runs")


if __name__ == "__main__":
    main()
