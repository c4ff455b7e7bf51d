"""``make bench``: models x {ORT FP32, ORT INT8, tvmq FP32, INT8, INT4, mixed}, one run.

Every latency is measured in this run on this machine, batch 1, with ONNX Runtime measured
beside tvmq: all builds are compiled first, then timed in turn for a few rounds, each
keeping its least median; ratios are against ONNX Runtime FP32 (> 1 means faster than it).
Accuracy is reported where the model has real data (the bundled digits). Mixed INT4/INT8
builds run at each ``--budgets`` budget (size fractions, or ``bops:0.4``: bit-operations,
with activation widths chosen too). ``tvmq-fp32`` and ``tvmq-int8`` are untuned
(default schedules only); the ``-shipped`` builds are what ``tvmq compile`` gives by default
(with the tuning records shipped for this CPU, ``schedules/shipped.py``). ``--tune-trials
100,400`` also tunes FP32 and INT8 in this run (``tvmq tune``, continuing the same records
to each trial count) and times the build at each count: latency against trials spent,
with the tuning wall time. Writes ``bench/NAME.md`` and ``bench/NAME.json`` (``--name``,
default ``results``) and prints the tables.

    python -m bench.run [--models digits,resnet50,...] [--builds tvmq-fp32,tvmq-int8]
                        [--budgets 0.6,0.8] [--tune-trials 100,400] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from tvmq.schedules.tune import tune

import tvmq
from tvmq.config import BUILT_QUANTIZE_MODES, QuantizeMode
from tvmq.demo import onnxruntime_latency_ms
from tvmq.examples import DIGITS_MODEL, digits_calibration_set, digits_test_set
from tvmq.models import bert_encoder_layer, light_zoo_models, mobilenet_v2


@dataclass
class Cell:
    build: str
    latency_ms: float | None = None
    size_bytes: int | None = None
    accuracy: float | None = None
    note: str = ""
    trials: int | None = None  # tuned builds: measurements spent in tvmq tune
    tuning_s: float | None = None  # tuned builds: tuning wall time to get there


def _models() -> dict[str, Callable[[str], str]]:
    zoo = light_zoo_models()

    def saved(builder):
        def make(work: str) -> str:
            path = os.path.join(work, f"{builder.__name__}.onnx")
            onnx.save(builder(), path)
            return path

        return make

    return {
        "digits": lambda work: DIGITS_MODEL,
        "resnet50": lambda work: zoo["resnet50"],
        "vgg19": lambda work: zoo["vgg19"],
        "mobilenet_v2": saved(mobilenet_v2),
        "bert_layer": saved(bert_encoder_layer),
    }


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ort_session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _calibration(path: str, feed: dict[str, np.ndarray], samples: int = 32):
    """Calibration inputs: the real calibration digits, random data for the other models."""
    if path == DIGITS_MODEL:
        images, _ = digits_calibration_set()
        return [{"input": image[None]} for image in images]
    rng = np.random.default_rng(1)
    return [
        {k: rng.random(v.shape, dtype=np.float32).astype(v.dtype) for k, v in feed.items()}
        for _ in range(samples)
    ]


def _ort_int8(path: str, calibration, work: str) -> str:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    out = os.path.join(work, os.path.basename(path).replace(".onnx", "-ort-int8.onnx"))
    quantize_static(path, out, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def _accuracy(predict: Callable[[np.ndarray], np.ndarray]) -> float:
    images, labels = digits_test_set()
    hits = sum(int(np.argmax(predict(image[None])) == label)
               for image, label in zip(images, labels, strict=True))
    return hits / len(labels)


def tvmq_builds(budgets: list[str]) -> list[tuple[str, QuantizeMode, dict]]:
    """(label, mode, compile options) of each tvmq build: FP32 and INT8 without and with the
    shipped tuning records, INT4 (W4A8), W4A4 (4-bit activations, MSE calibration), and mixed
    INT4/INT8 at each budget: a size budget (a fraction of the INT8 weight bytes), or
    ``bops:0.4`` / ``latency:0.8`` for the other kinds."""
    shipped = {"shipped_records": True}
    return [
        ("tvmq-fp32", QuantizeMode.NONE, {"shipped_records": False}),
        ("tvmq-fp32-shipped", QuantizeMode.NONE, shipped),
        ("tvmq-int8", QuantizeMode.INT8, {"shipped_records": False}),
        ("tvmq-int8-shipped", QuantizeMode.INT8, shipped),
        ("tvmq-int4", QuantizeMode.INT4, shipped),
        ("tvmq-w4a4", QuantizeMode.INT4,
         {**shipped, "qconfig": tvmq.QConfig(activation_bits=4, calibration="mse")}),
        *(_mixed_build(b, shipped) for b in budgets),
    ]


def _mixed_build(budget: str, options: dict) -> tuple[str, QuantizeMode, dict]:
    kind, _, value = budget.rpartition(":")
    label = f"tvmq-mixed-{kind}-{value}" if kind else f"tvmq-mixed-{value}"
    return label, QuantizeMode.MIXED, {**options, f"{kind or 'size'}_budget": value}


# Timing rounds over all of a model's builds (bench_model).
ROUNDS = 3

# The builds --tune-trials tunes: label prefix and mode.
TUNED = (("tvmq-fp32-tuned", QuantizeMode.NONE), ("tvmq-int8-tuned", QuantizeMode.INT8))


def bench_model(name: str, path: str, work: str, repeat: int, budgets: list[str],
                builds: set[str] | None = None, tune_trials: list[int] = ()) -> list[Cell]:
    session = _ort_session(path)
    feed = {i.name: np.random.default_rng(0).random(
        [d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
        for i in session.get_inputs()}
    if path == DIGITS_MODEL:
        feed = {"input": digits_test_set()[0][:1]}
    cells = []
    timed: list[tuple[Cell, Callable[[], float]]] = []  # timed in rounds once all are built

    def ort(model) -> Callable[[], float]:
        return lambda: onnxruntime_latency_ms(model, feed, repeat)

    cells.append(Cell("ort-fp32", size_bytes=os.path.getsize(path)))
    timed.append((cells[-1], ort(session)))
    if path == DIGITS_MODEL:
        cells[-1].accuracy = _accuracy(lambda x: session.run(None, {"input": x})[0])
    calibration = _calibration(path, feed)
    _progress(f"{name}: ONNX Runtime INT8 (quantize_static, QDQ, per-channel)")
    try:
        int8_path = _ort_int8(path, calibration, work)
        int8 = _ort_session(int8_path)
        cell = Cell("ort-int8", size_bytes=os.path.getsize(int8_path))
        timed.append((cell, ort(int8)))
        if path == DIGITS_MODEL:
            cell.accuracy = _accuracy(lambda x: int8.run(None, {"input": x})[0])
    except Exception as err:  # the peer failing on a model is a result, not a crash
        cell = Cell("ort-int8", note=f"failed: {type(err).__name__}")
    cells.append(cell)

    def build(label: str, mode: QuantizeMode, **options) -> Cell:
        _progress(f"{name}: {label} compile")
        artifact = os.path.join(work, f"{name}-{label}.tar")
        if mode is not QuantizeMode.NONE:
            options.update(quantize=mode.value, calibration_data=calibration)
        try:
            start = time.perf_counter()
            tvmq.compile(path, target="x86", **options).export(artifact)
            compile_s = time.perf_counter() - start
        except tvmq.TvmqError as err:
            return Cell(label, note=f"failed: {err}")
        model = tvmq.runtime.load(artifact)
        _progress(f"{name}: {label} built in {compile_s:.0f} s")
        cell = Cell(label, size_bytes=os.path.getsize(artifact))
        timed.append((cell, lambda: model.benchmark(
            repeat=repeat, number=max(1, 50 // repeat), inputs=feed).median_ms))
        if path == DIGITS_MODEL:
            cell.accuracy = _accuracy(lambda x, m=model: next(iter(m.run(input=x).values())))
        return cell

    for label, mode, options in tvmq_builds(budgets):
        if builds is not None and label not in builds:
            continue
        if mode not in BUILT_QUANTIZE_MODES:
            cells.append(Cell(label, note="not built yet"))
            continue
        cells.append(build(label, mode, **options))
    for prefix, mode in TUNED:
        if not tune_trials or (builds is not None and prefix not in builds):
            continue
        records = os.path.join(work, f"{name}-{prefix}-records")
        config = tvmq.CompileConfig(
            quantize=mode, calibration_data=None if mode is QuantizeMode.NONE else calibration)
        spent = 0.0
        for trials in sorted(tune_trials):
            _progress(f"{name}: {prefix} tune to {trials} trials")
            start = time.perf_counter()
            tune(path, target="x86", records=records, trials=trials, config=config,
                      progress=False)
            spent += time.perf_counter() - start
            # The build's own records only: what tuning in this run reached.
            cell = build(f"{prefix}-{trials}", mode, tuning_records=records,
                         shipped_records=False)
            cell.trials, cell.tuning_s = trials, spent
            cells.append(cell)
    # Every build in turn, ROUNDS times, each its least median: a neighbour's burst on this
    # shared machine slows whichever build it lands on, not the comparison.
    for round_ in range(ROUNDS):
        _progress(f"{name}: timing round {round_ + 1} of {ROUNDS}")
        for cell, measure in timed:
            ms = measure()
            if ms is not None:
                cell.latency_ms = ms if cell.latency_ms is None else min(cell.latency_ms, ms)
    return cells


def markdown(results: dict[str, list[Cell]], budgets: list[str]) -> str:
    builds = ["ort-fp32", "ort-int8", *(label for label, *_ in tvmq_builds(budgets))]
    lines = [
        "| model | " + " | ".join(builds) + " |",
        "|---|" + "---|" * len(builds),
    ]
    for name, cells in results.items():
        by_build = {c.build: c for c in cells}
        base = by_build["ort-fp32"].latency_ms
        row = []
        for build in builds:
            c = by_build.get(build)
            if c is None or c.latency_ms is None:
                row.append(c.note if c else "-")
                continue
            ratio = base / c.latency_ms
            text = f"{c.latency_ms:.3f} ms ({ratio:.2f}x), {c.size_bytes / 1e6:.2f} MB"
            if c.accuracy is not None:
                text += f", top-1 {c.accuracy * 100:.1f}%"
            row.append(text)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Latency: batch 1 on this machine, same run: each build's least median of "
                 f"{ROUNDS} rounds that ran every build in turn; (Nx) = ONNX Runtime FP32 "
                 "latency / this latency. Sizes: ONNX file or tvmq artifact. tvmq-fp32 / "
                 "tvmq-int8: default schedules only; -shipped (and int4, mixed): with the "
                 "tuning records shipped for this CPU, as tvmq compile builds by default.")
    tuned = [(name, c) for name, cells in results.items() for c in cells if c.trials]
    if tuned:
        lines += ["", "Tuned in this run (tvmq tune, records continued to each trial count):",
                  "", "| model | build | trials | tuning s | latency | vs ORT FP32 | vs ORT INT8 |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in tuned:
            by_build = {b.build: b for b in results[name]}
            if c.latency_ms is None:
                lines.append(f"| {name} | {c.build} | {c.trials} | {c.tuning_s:.0f} | "
                             f"{c.note} | - | - |")
                continue
            ratios = [f"{by_build[b].latency_ms / c.latency_ms:.2f}x"
                      if by_build.get(b) and by_build[b].latency_ms else "-"
                      for b in ("ort-fp32", "ort-int8")]
            lines.append(f"| {name} | {c.build} | {c.trials} | {c.tuning_s:.0f} | "
                         f"{c.latency_ms:.3f} ms | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(_models()))
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--budgets", default="0.6",
                        help="budgets of the mixed builds, comma-separated: size fractions, "
                        "or kind:value (e.g. 0.6,0.8,bops:0.4)")
    parser.add_argument("--name", default="results",
                        help="file name (without extension) of the tables written to --out")
    parser.add_argument("--tune-trials", default="",
                        help="also tune FP32 and INT8 to these trial counts, comma-separated "
                        "(e.g. 100,400); builds tvmq-fp32-tuned and tvmq-int8-tuned")
    parser.add_argument("--builds", default=None,
                        help="tvmq builds to run, comma-separated (e.g. tvmq-fp32,tvmq-int8; "
                        "default: all); ONNX Runtime FP32 and INT8 always run")
    args = parser.parse_args(argv)
    builders = _models()
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    tune_trials = [int(t) for t in args.tune_trials.split(",") if t.strip()]
    labels = [label for label, *_ in tvmq_builds(budgets)] + [prefix for prefix, _ in TUNED]
    builds = None
    if args.builds:
        builds = {b.strip() for b in args.builds.split(",") if b.strip()}
        if builds - set(labels):
            parser.error(f"unknown build {sorted(builds - set(labels))[0]!r}; choose from "
                         f"{', '.join(labels)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tvmq-bench-") as work:
        for name in args.models.split(","):
            if name not in builders:
                parser.error(f"unknown model {name!r}; choose from {', '.join(builders)}")
            results[name] = bench_model(name, builders[name](work), work, args.repeat,
                                        budgets, builds, tune_trials)
    table = markdown(results, budgets)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as handle:
        json.dump({k: [asdict(c) for c in v] for k, v in results.items()}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
