"""Per-layer convolution algorithms: ResNet-50 and VGG-19 with the rewrites off and on.

For each model: every float convolution measured as direct, im2col + GEMM and Winograd
F(2x2,3x3) / F(4x4,3x3) where they apply (``--conv-algorithm measure``), the algorithm each
layer got, the end-to-end latency with every layer direct (rewrites off), with the
measured choice (rewrites on) and with the ``predict`` rule (the default build), against
ONNX Runtime FP32 timed in the same run, and how often the rule agrees with measurement.

    python -m bench.conv_algorithms [--models resnet50,vgg19]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import tvmq
from tvmq.demo import onnxruntime_latency_ms
from tvmq.frontend import random_inputs
from tvmq.models import light_zoo_models


def _latencies(models: dict, rounds: int = 3) -> dict[str, float]:
    """Median latency of each model, the builds timed in turn ``rounds`` times (on a shared
    machine a drift then hits every build alike); the median of the rounds."""
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            times[label].append(model.benchmark(repeat=10, number=3).median_ms)
    return {label: sorted(t)[len(t) // 2] for label, t in times.items()}


def bench(name: str, path: str, work: str) -> str:
    lines = [f"## {name}"]
    start = time.perf_counter()
    built = {policy: tvmq.compile(path, conv_algorithm=policy)
             for policy in ("direct", "measure", "predict")}
    models = {policy: tvmq.runtime.load(artifact.export(os.path.join(work, f"{name}-{policy}.tar")))
              for policy, artifact in built.items()}
    artifact = built["measure"]
    print(f"[{name}] compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lines.append("| layer | input | weight | stride | direct | gemm | winograd2 | winograd4 "
                 "| chosen | predicted |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    agree = 0
    records = artifact.manifest["conv_algorithms"]
    for record in records:
        ms = record["measured_ms"]
        cells = [f"{ms[a]:.3f}" if a in ms else "-"
                 for a in ("direct", "gemm", "winograd2", "winograd4")]
        predicted = record["predicted"]
        agree += predicted == record["algorithm"]
        lines.append(
            f"| {record['node']} | {'x'.join(map(str, record['input_shape']))} | "
            f"{'x'.join(map(str, record['weight_shape']))} | {record['strides'][0]} | "
            + " | ".join(cells) + f" | {record['algorithm']} | {predicted} |"
        )
    ms = _latencies(models)
    feed = random_inputs(models["direct"].inputs)
    ort_ms = onnxruntime_latency_ms(path, feed, repeat=30)
    lines.append("")
    lines.append(
        f"end to end: rewrites off (all direct) {ms['direct']:.2f} ms, rewrites on (measured "
        f"choice) {ms['measure']:.2f} ms ({ms['direct'] / ms['measure']:.2f}x), predict (the "
        f"default) {ms['predict']:.2f} ms ({ms['direct'] / ms['predict']:.2f}x); ONNX Runtime "
        f"FP32 {ort_ms:.2f} ms (tvmq predict at {ort_ms / ms['predict']:.2f}x its speed); the "
        f"predict rule agrees with measurement on {agree}/{len(records)} layers")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vgg19")
    args = parser.parse_args(argv)
    zoo = light_zoo_models()
    with tempfile.TemporaryDirectory(prefix="tvmq-conv-") as work:
        for name in args.models.split(","):
            print(bench(name, zoo[name], work), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
