"""Tune the benchmark models for a preset and ship the records that beat the defaults.

Run on a machine of the preset (this one for ``x86-vnni``), from the repository root:

    .venv/bin/python scripts/ship_records.py --preset x86-vnni --work /tmp/ship \\
        --trials mobilenet_v2:fp32=600,mobilenet_v2:int8=1300,resnet50:fp32=800,resnet50:int8=1500

Each model and mode is tuned into its own records directory under ``--work`` (a rerun
continues them), INT8 calibrated on random images (records match other calibrations by
their skeleton, ``schedules/workloads.py``); then every directory under ``--work`` is pruned
into ``schedules/tuned/PRESET/`` (``schedules/shipped.py``: kernels whose tuned schedule beat
the default by at least 5% in tuning and again in a fresh A/B timing, ``ab_check``: a
measurement taken while the machine was busy can make a default look slow).
``--ship-only`` skips the tuning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from tvmq.schedules.shipped import TUNED_DIR, ab_check, ship
from tvmq.schedules.tune import tune

import tvmq
from tvmq.models import light_zoo_models, mobilenet_v2


def _model(name: str, work: str) -> str:
    if name == "mobilenet_v2":
        path = os.path.join(work, "mobilenet_v2.onnx")
        onnx.save(mobilenet_v2(), path)
        return path
    return light_zoo_models()[name]


def _calibration(path: str) -> list[dict[str, np.ndarray]]:
    graph = onnx.load(path).graph
    initializers = {i.name for i in graph.initializer}
    (first,) = [i for i in graph.input if i.name not in initializers]
    shape = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    return [{first.name: rng.random(shape, dtype=np.float32)} for _ in range(8)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="x86-vnni")
    parser.add_argument("--work", required=True, help="where the records directories live")
    parser.add_argument("--trials", default="mobilenet_v2:fp32=600,mobilenet_v2:int8=1300,"
                        "resnet50:fp32=800,resnet50:int8=1500",
                        help="MODEL:MODE=TRIALS, comma-separated")
    parser.add_argument("--early-stopping", type=int, default=16)
    parser.add_argument("--ship-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if not args.ship_only:
        for item in args.trials.split(","):
            spec, trials = item.split("=")
            name, mode = spec.split(":")
            path = _model(name, args.work)
            config = tvmq.CompileConfig(
                quantize="none" if mode == "fp32" else mode,
                calibration_data=None if mode == "fp32" else _calibration(path))
            start = time.perf_counter()
            result = tune(path, target=args.preset, records=os.path.join(args.work, spec),
                          trials=int(trials), early_stopping=args.early_stopping, config=config)
            print(f"{spec}: {result.measured_now} measured in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
    sources = sorted(os.path.join(args.work, d) for d in os.listdir(args.work)
                     if os.path.isdir(os.path.join(args.work, d)))
    destination = os.path.join(TUNED_DIR, args.preset)
    target = tvmq.targets.resolve(args.preset).tvm_target()
    counts = ship(sources, destination,
                  check=ab_check(target, lambda line: print(line, file=sys.stderr)))
    print(f"{destination}: {counts['beat']} of {counts['kernels']} kernels beat their default "
          f"by >= 5% in tuning; {counts['shipped']} again when timed afresh (shipped)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
