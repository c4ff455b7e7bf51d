"""Per-layer convolution algorithms: ResNet-50 and VGG-19 with the rewrites off and on.

For each model: every float convolution measured as direct, im2col + GEMM and Winograd
F(2x2,3x3) / F(4x4,3x3) where they apply (``--conv-algorithm measure``), the algorithm each
layer got, the end-to-end latency with every layer direct (rewrites off) and with the
measured choice (rewrites on), and how often the ``predict`` rule agrees with measurement.

    python -m bench.conv_algorithms [--models resnet50,vgg19]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import tvmq
from tvmq.models import light_zoo_models


def _latency(path: str) -> float:
    model = tvmq.runtime.load(path)
    return model.benchmark(repeat=10, number=3).median_ms


def bench(name: str, path: str, work: str) -> str:
    lines = [f"## {name}"]
    off = os.path.join(work, f"{name}-direct.tar")
    on = os.path.join(work, f"{name}-measured.tar")
    start = time.perf_counter()
    tvmq.compile(path, conv_algorithm="direct").export(off)
    artifact = tvmq.compile(path, conv_algorithm="measure")
    artifact.export(on)
    print(f"[{name}] compiled both in {time.perf_counter() - start:.0f} s", file=sys.stderr)
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
    direct_ms, measured_ms = _latency(off), _latency(on)
    lines.append("")
    lines.append(f"end to end: rewrites off (all direct) {direct_ms:.2f} ms, rewrites on "
                 f"(measured choice) {measured_ms:.2f} ms ({direct_ms / measured_ms:.2f}x); "
                 f"the predict rule agrees with measurement on {agree}/{len(records)} layers")
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
