"""The ``tvmq`` command line: a thin adapter over the Python API.

Exit status: 0 on success, 2 on a usage error, 1 on any other error (one line on
stderr; ``--verbose`` adds the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence

import numpy as np

from .errors import ConfigError, InputError, TvmqError
from .qconfig import QConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TvmqError as err:
        print(f"tvmq: error: {err}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("tvmq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"tvmq: internal error: {type(err).__name__}: {first[:300]} "
            "(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        if args.verbose:
            traceback.print_exc()
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvmq", description="Quantize, compile, tune and profile models with Apache TVM."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    # The graph options: compile and tune take the same ones, so tune measures the very
    # kernels compile builds.
    graph = argparse.ArgumentParser(add_help=False)
    graph.add_argument("model", help="the .onnx file")
    graph.add_argument("--target", default="x86", help="a preset (tvmq targets) or a JSON dict")
    graph.add_argument("--input-shapes", type=_input_shapes, default=None,
                       help='static input shapes: "name:1x3x224x224,other:1x10"')
    graph.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "mixed"])
    graph.add_argument("--calibration-data",
                       help="an .npz (arrays named after the inputs) or a directory of .npz/.npy")
    graph.add_argument("--activation-bits", type=int, choices=[8, 4], default=None,
                       help="bits of the activations the quantized layers read (4: W4A4 with "
                            "--quantize int4, W8A4 with int8; default 8)")
    graph.add_argument("--calibration-method", default=None,
                       choices=["minmax", "percentile", "kl", "mse"],
                       help="how activation ranges are chosen (default minmax; mse suits "
                            "4-bit activations)")
    for kind, example in (("size", "0.6 or 1.5MB"), ("latency", "0.6 or 2ms"),
                          ("bops", "0.6 or 3G")):
        graph.add_argument(f"--{kind}-budget", metavar="B",
                           help=f"--quantize mixed: the {kind} budget, a fraction of the INT8 "
                                f"model or an amount ({example})"
                                + ("; also chooses 4- or 8-bit activations per tensor"
                                   if kind == "bops" else ""))
    graph.add_argument("--disabled-pass", action="append", default=[], metavar="NAME",
                       help="leave a pass out of the pipeline (repeatable)")
    graph.add_argument("--conv-algorithm", default="predict",
                       choices=["predict", "measure", "direct", "gemm", "winograd"],
                       help="how each convolution's algorithm is chosen (measure: time them)")
    graph.add_argument("--conv-override", action="append", default=[], metavar="NODE=ALGORITHM",
                       type=_override, help="fix one layer's algorithm (ONNX node name or glob)")

    c = sub.add_parser("compile", parents=[common, graph],
                       help="compile a model into an artifact")
    c.add_argument("--quantize-report", metavar="FILE.json",
                   help="write the per-layer quantization report (scales, bits, SQNR)")
    c.add_argument("--tuning-records", help="a tvmq tune --records directory")
    c.add_argument("--no-shipped-records", dest="shipped_records", action="store_false",
                   help="do not apply the tuning records shipped for the target")
    c.add_argument("--dump-ir", metavar="DIR", help="write the module after each pass")
    c.add_argument("-o", "--output", required=True, help="the artifact to write (.tar)")
    c.set_defaults(func=_compile)

    u = sub.add_parser("tune", parents=[common, graph],
                       help="tune a model's kernels for a target")
    u.add_argument("--trials", type=_positive, required=True,
                   help="measurements in all, shared by the kernels")
    u.add_argument("--records", required=True, metavar="DIR",
                   help="the records directory: created, or continued where a run stopped")
    u.add_argument("--early-stopping", type=_positive, metavar="N",
                   help="stop a kernel after N measurements without a new best")
    u.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the RPC servers of this TVM tracker")
    u.add_argument("--rpc-key", metavar="KEY", help="the key the RPC servers registered")
    u.set_defaults(func=_tune)

    r = sub.add_parser("run", parents=[common], help="run an artifact")
    r.add_argument("artifact")
    source = r.add_mutually_exclusive_group()
    source.add_argument("--inputs", help="an .npz with one array per input")
    source.add_argument("--fill-mode", choices=["zeros", "ones", "random"], default="random")
    r.add_argument("--outputs", help="write the outputs to this .npz")
    r.add_argument("--print-time", action="store_true", help="print latency statistics")
    r.add_argument("--repeat", type=_positive, default=10)
    r.add_argument("--number", type=_positive, default=5)
    r.add_argument("--benchmark-json", help="write latency statistics to this JSON file")
    r.add_argument("--emulate", action="store_true",
                   help="run an aarch64 artifact here under qemu-aarch64 (numbers, not timing)")
    r.set_defaults(func=_run)

    f = sub.add_parser("profile", parents=[common], help="time each kernel of an artifact")
    f.add_argument("artifact")
    feed = f.add_mutually_exclusive_group()
    feed.add_argument("--inputs", help="an .npz with one array per input")
    feed.add_argument("--fill-mode", choices=["zeros", "ones", "random"], default="random")
    f.add_argument("--repeat", type=_positive, default=20)
    f.add_argument("--cold", action="store_true",
                   help="time each kernel after flushing the caches (as if its data came "
                        "from memory; the default times them warm)")
    f.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    f.add_argument("-o", "--output", help="write the report to this file")
    f.add_argument("--baseline", action="append", default=[], metavar="OTHER.tar",
                   help="profile another build of the same model and compare layer by layer")
    f.add_argument("--eval-data", metavar="FILE.npz",
                   help="inputs (first axis = samples) and 'labels': top-1 of each artifact")
    f.set_defaults(func=_profile)

    t = sub.add_parser("targets", parents=[common], help="list the target presets")
    t.set_defaults(func=_targets)

    p = sub.add_parser("passes", parents=[common], help="list the pipeline for a target")
    p.add_argument("--target", default="x86")
    p.set_defaults(func=_passes)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _override(text: str) -> tuple[str, str]:
    node, sep, algorithm = text.rpartition("=")
    if not sep or not node:
        raise argparse.ArgumentTypeError(f"--conv-override {text!r} is not NODE=ALGORITHM")
    return node, algorithm


def _input_shapes(text: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise argparse.ArgumentTypeError(
                f"--input-shapes item {item!r} is not NAME:DxDxD (e.g. input:1x3x224x224)"
            )
        shapes[name] = shape
    return shapes


def _graph_options(args) -> dict:
    """The options ``compile`` and ``tune`` share, as ``tvmq.compile`` keywords (which are
    also the CompileConfig fields)."""
    quantizer = {"activation_bits": args.activation_bits, "calibration": args.calibration_method}
    given = {k: v for k, v in quantizer.items() if v is not None}
    for flag, value in (("--calibration-data", args.calibration_data),
                        ("--activation-bits", args.activation_bits),
                        ("--calibration-method", args.calibration_method)):
        if value is not None and args.quantize == "none":
            raise ConfigError(f"{flag} is only used with --quantize int8, int4 or mixed")
    return {
        "quantize": args.quantize,
        "qconfig": QConfig(**given) if given else None,
        "calibration_data": args.calibration_data,
        "size_budget": args.size_budget,
        "latency_budget": args.latency_budget,
        "bops_budget": args.bops_budget,
        "disabled_passes": args.disabled_pass,
        "conv_algorithm": args.conv_algorithm,
        "conv_overrides": dict(args.conv_override),
    }


def _compile(args) -> int:
    from .build import compile

    start = time.perf_counter()
    artifact = compile(
        args.model,
        target=_target_arg(args.target),
        input_shapes=args.input_shapes,
        quantize_report=args.quantize_report,
        tuning_records=args.tuning_records,
        shipped_records=args.shipped_records,
        dump_ir=args.dump_ir,
        **_graph_options(args),
    )
    artifact.export(args.output)
    size = os.path.getsize(args.output) / 1e6
    preset = artifact.manifest["target"]["preset"]
    print(
        f"compiled {args.model} for {preset} in {time.perf_counter() - start:.1f} s -> "
        f"{args.output} ({size:.2f} MB)"
    )
    return 0


def _tune(args) -> int:
    from .config import CompileConfig
    from .schedules.tune import RPCTracker, tune

    options = _graph_options(args)
    if args.rpc_key and not args.rpc_tracker:
        raise ConfigError("--rpc-key needs --rpc-tracker HOST:PORT")
    rpc = RPCTracker.parse(args.rpc_tracker, args.rpc_key or "") if args.rpc_tracker else None
    config = CompileConfig(**options)
    result = tune(
        args.model,
        target=_target_arg(args.target),
        records=args.records,
        trials=args.trials,
        early_stopping=args.early_stopping,
        rpc=rpc,
        config=config,
        input_shapes=args.input_shapes,
    )
    width = max(len(k.name) for k in result.kernels)
    print(f"{'kernel':<{width}}  trials  best (ms)")
    for k in result.kernels:
        best = f"{k.best_ms:.4g}" if k.best_ms is not None else "-"
        print(f"{k.name:<{width}}  {k.trials:>6}  {best:>9}")
    print(
        f"measured {result.measured_now} schedules in {result.seconds:.1f} s -> {args.records} "
        f"(compile with --tuning-records {args.records})"
    )
    return 0


def _target_arg(text: str):
    return json.loads(text) if text.lstrip().startswith("{") else text


def _run(args) -> int:
    from .emulate import load_emulated
    from .runtime import load

    if args.emulate and (args.print_time or args.benchmark_json):
        raise ConfigError(
            "--print-time and --benchmark-json time qemu, not the model: timing under "
            "emulation is meaningless; run the artifact on an aarch64 board to time it"
        )
    model = load_emulated(args.artifact) if args.emulate else load(args.artifact)
    inputs = _inputs(args, model)
    outputs = model.run(**inputs)
    if args.outputs:
        np.savez(args.outputs, **outputs)
    for name, value in outputs.items():
        preview = np.array2string(value.ravel()[:6], precision=4, separator=", ")
        print(f"output '{name}' {value.dtype} {value.shape}: {preview}")
    if args.print_time or args.benchmark_json:
        result = model.benchmark(repeat=args.repeat, number=args.number, inputs=inputs)
        if args.print_time:
            print(
                f"latency (ms): median {result.median_ms:.3f}  mean {result.mean_ms:.3f}  "
                f"min {result.min_ms:.3f}  max {result.max_ms:.3f}  std {result.std_ms:.3f}  "
                f"({result.repeat} x {result.number} runs)"
            )
        if args.benchmark_json:
            with open(args.benchmark_json, "w") as handle:
                json.dump(result.to_json(), handle, indent=2)
    return 0


def _profile(args) -> int:
    from .profiler import profile, top1, write
    from .runtime import load

    model = load(args.artifact)
    inputs = _inputs(args, model)
    result = profile(model, inputs=inputs, repeat=args.repeat, cold=args.cold)
    result = dataclasses.replace(result, artifact=args.artifact,
                                 size_bytes=os.path.getsize(args.artifact))
    baselines, others = [], []
    for path in args.baseline:
        other = load(path)
        others.append(other)
        baseline = profile(other, inputs=_inputs(args, other), repeat=args.repeat,
                           cold=args.cold)
        baselines.append(
            dataclasses.replace(baseline, artifact=path, size_bytes=os.path.getsize(path))
        )
    accuracy = {}
    if args.eval_data:
        data = _read_npz(args.eval_data)
        for path, loaded in [(args.artifact, model), *zip(args.baseline, others, strict=True)]:
            accuracy[path] = top1(loaded, data, args.eval_data)
    text = write(result, args.format, args.output, baselines, accuracy)
    if args.output:
        print(f"wrote {args.format} profile of {args.artifact} to {args.output}")
    else:
        print(text)
    return 0


def _inputs(args, model) -> dict[str, np.ndarray]:
    from .frontend import random_inputs

    if args.inputs:
        return _read_npz(args.inputs)
    if args.fill_mode == "random":
        return random_inputs(model.inputs)
    fill = np.zeros if args.fill_mode == "zeros" else np.ones
    return {i.name: fill(i.shape, dtype=i.dtype) for i in model.inputs}


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise InputError(f"inputs file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError) as err:
        raise InputError(f"inputs file '{path}' is not a readable .npz ({err})") from None


def _targets(args) -> int:
    from .targets import PRESETS

    for preset in PRESETS.values():
        print(preset.describe())
    return 0


def _passes(args) -> int:
    from .pipeline import pass_name, pipeline

    for index, p in enumerate(pipeline(_target_arg(args.target)), start=1):
        print(f"{index:2d} {pass_name(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
