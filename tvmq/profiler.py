"""Where the time goes: per-kernel latency, work and efficiency of an artifact.

The Relax VM lost its profiler; tvmq records every kernel call of a run (and its arguments)
through the VM's instrument hook, then times each call on those arguments with TVM's time
evaluator. The mean end-to-end time is measured without the hook; what it spends outside
the kernels is the VM's own row, and the report says how far the kernels' sum is from the
end-to-end time.

Peak throughput of this host, the denominator of "% of peak":

- fp32: vector lanes (8 with AVX2, 16 with AVX-512, 4 with NEON) x 2 FMA units x 2 flops
  x cores x clock (``cpu MHz`` in /proc/cpuinfo).
- int8: 4x the fp32 rate with VNNI (``vpdpbusd``: 4 multiply-adds per 32-bit lane) or ARM
  dot product, 2x without (``vpmaddubsw`` + ``vpmaddwd``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from .frontend import random_inputs
from .runtime import Model, load
from .targets.preset import host_cpu_features
from .threads import use_every_core


@dataclass(frozen=True)
class KernelRow:
    """One kernel (fused op): its time per model run and what it computes."""

    name: str
    calls: int
    time_ms: float
    share: float
    ops: int
    bytes: int
    throughput_gops: float
    peak_fraction: float
    nodes: tuple[str, ...]
    precision: str
    algorithm: str
    schedule: str = "default"  # tuned (--tuning-records), shipped or default


@dataclass(frozen=True)
class Profile:
    """A per-kernel profile of one artifact on this machine."""

    artifact: str
    target: str
    rows: tuple[KernelRow, ...]
    end_to_end_ms: float
    kernels_ms: float
    peak_gops: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    cold: bool = False  # each kernel timed after the caches were flushed (profile(cold=))

    @property
    def difference(self) -> float:
        """(sum of kernels - end to end) / end to end: below 0 by the VM's own work and the
        cache misses kernels meet in sequence (timed alone, each runs on data it warmed:
        MobileNetV2's kernels summed 4.0 ms so, 6.6-7.4 with a 64 MB cache flush before
        each, against 5.5-5.9 end to end); above 0, the kernels ran slower alone."""
        return (self.kernels_ms - self.end_to_end_ms) / self.end_to_end_ms

    def to_json(self) -> dict:
        data = asdict(self)
        data["difference"] = self.difference
        return data

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        names = [f for f in KernelRow.__dataclass_fields__]
        writer.writerow(names)
        for row in self.rows:
            values = asdict(row)
            values["nodes"] = ";".join(row.nodes)
            writer.writerow([values[n] for n in names])
        return out.getvalue()

    def to_table(self) -> str:
        lines = [
            f"profile of {self.artifact} (target {self.target})"
            + (f"; kernels timed cold, after {COLD_FLUSH_BYTES >> 20} MB written to flush "
               "the caches" if self.cold else ""),
            f"{'kernel':<40} {'calls':>5} {'ms':>9} {'share':>6} {'GOP/s':>8} {'peak':>6} "
            f"{'prec':>5} {'algo':>9} {'sched':>7}  nodes",
        ]
        for r in self.rows:
            nodes = ", ".join(r.nodes[:3]) + (" ..." if len(r.nodes) > 3 else "")
            lines.append(
                f"{r.name[:40]:<40} {r.calls:>5} {r.time_ms:>9.4f} {r.share * 100:>5.1f}% "
                f"{r.throughput_gops:>8.2f} {r.peak_fraction * 100:>5.1f}% {r.precision:>5} "
                f"{r.algorithm:>9} {r.schedule:>7}  {nodes}"
            )
        why = ("each kernel met emptier caches than in sequence" if self.cold else
               "the rest is the VM's own work, allocation, shape checks and dispatch, and "
               "the cache misses a kernel meets in sequence but not timed alone (--cold "
               "times them after a flush)")
        lines.append(
            f"sum of kernels {self.kernels_ms:.4f} ms, end to end {self.end_to_end_ms:.4f} ms "
            f"(kernels {self.difference * 100:+.1f}%; {why})"
        )
        return "\n".join(lines)


def profile(
    artifact: str | os.PathLike | Model,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    repeat: int = 20,
    cold: bool = False,
) -> Profile:
    """Profile an artifact (a path or a loaded model) on this machine.

    ``cold``: time each kernel after flushing the caches (``COLD_FLUSH_BYTES`` written), as
    it would meet its weights and inputs coming from memory: the upper bound of what it
    costs in sequence, where timed warm (the default) is the lower one."""
    model = artifact if isinstance(artifact, Model) else load(artifact)
    source = "model" if isinstance(artifact, Model) else os.fspath(artifact)
    feed = dict(inputs) if inputs is not None else random_inputs(model.inputs)
    per_kernel, builtins = _time_calls(model, feed, repeat, cold)
    end_to_end = model.benchmark(repeat=repeat, number=10, inputs=feed).mean_ms
    kernels_ms = sum(sum(times) for times in per_kernel.values())
    # The VM's own work (builtins: allocation, shape checks; dispatch between calls) is what
    # the uninstrumented run spends outside the kernels: each of those steps takes well under
    # a microsecond, less than the hook's own cost varies by, so timing them one by one
    # measured the hook (the digits model: 51 us of "runtime" in a 52 us run).
    runtime_ms = max(0.0, end_to_end - kernels_ms)
    total = kernels_ms + runtime_ms
    peaks = peak_gops(model.manifest)
    table = model.manifest.get("kernels", {})
    rows = []
    for symbol, times in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
        info = table.get(symbol, {})
        spent = sum(times)
        ops = int(info.get("ops", 0)) * len(times)
        precision = info.get("precision", "fp32")
        throughput = ops / (spent * 1e-3) / 1e9 if spent > 0 else 0.0
        rows.append(
            KernelRow(
                name=symbol,
                calls=len(times),
                time_ms=spent,
                share=spent / total if total else 0.0,
                ops=ops,
                bytes=int(info.get("bytes", 0)) * len(times),
                throughput_gops=throughput,
                peak_fraction=throughput / peaks.get(precision, peaks["fp32"]),
                nodes=tuple(info.get("nodes", ())),
                precision=precision,
                algorithm=info.get("algorithm", "-"),
                schedule=info.get("schedule", "default"),
            )
        )
    rows.append(
        KernelRow(
            name=RUNTIME_ROW,
            calls=builtins,
            time_ms=runtime_ms,
            share=runtime_ms / total if total else 0.0,
            ops=0, bytes=0, throughput_gops=0.0, peak_fraction=0.0,
            nodes=(), precision="-", algorithm="runtime", schedule="-",
        )
    )
    size = os.path.getsize(source) if os.path.isfile(source) else 0
    target = model.manifest.get("target", {}).get("preset", "?")
    return Profile(source, target, tuple(rows), end_to_end, kernels_ms, peaks, size, cold)


RUNTIME_ROW = "(end to end less kernels)"
# Bytes written between cold kernel timings: past this machine's caches (32 MB L3).
COLD_FLUSH_BYTES = 64 << 20


def _time_calls(model: Model, feed, repeat: int, cold: bool = False):
    """Time every kernel call of a run on the arguments it gets in that run.

    One run through the VM's instrument hook records each call's kernel and arguments; each
    call is then timed on those arguments by TVM's time evaluator, ``repeat`` measurements of
    at least a millisecond each, in C++ (as TVM's debug executor did). Timing the calls in
    place between the hook's Python callbacks measured the hook: its argument conversion
    falls inside the timed interval and grows with the arguments and the process (in the
    full test suite every digits kernel read 1.7-2x its time). A kernel timed alone meets
    caches it warmed itself, so a layer whose weights do not fit in cache reads faster than
    it runs in sequence; the end-to-end time, measured without the hook, is the check.
    Returns the trimmed mean (the fastest and slowest tenth left out) of each kernel call
    by kernel, and the number of the VM's builtin calls per run.
    """
    calls: list[tuple[str, object, list]] = []
    builtins = 0

    def instrument(func, symbol, before_run, _ret, *args):
        nonlocal builtins
        if before_run:
            if str(symbol).startswith("vm."):
                builtins += 1
            else:
                calls.append((str(symbol), func, list(args)))
        return 0

    model.set_inputs(feed)
    model.vm.invoke_stateful("main")  # warm up: first-run allocation is not what a kernel costs
    model.vm.set_instrument(instrument)
    try:
        model.vm.invoke_stateful("main")
    finally:
        # None removes the hook: a do-nothing Python hook left in place cost 1.7 us per
        # call and tripled the digits model's end-to-end time measured after it.
        model.vm.set_instrument(None)
    per_kernel: dict[str, list[float]] = {}
    for symbol, func, args in calls:
        times = _time_call(model, symbol, func, args, max(3, repeat), cold)
        per_kernel.setdefault(symbol, []).append(_trimmed_mean(times) * 1e3)
    return per_kernel, builtins


def _time_call(model: Model, symbol: str, func, args: list, repeat: int,
               cold: bool = False) -> list[float]:
    """Seconds per call of ``symbol`` on ``args``: by TVM's time evaluator where the
    artifact's library exports the kernel, else by a timed loop of calls from Python;
    ``cold``: one call per measurement, each after the caches were flushed."""
    library = next((lib for lib in (*model.library.imports, model.library)
                    if lib.implements_function(symbol, True)), None)
    if library is not None:
        options = ({"cache_flush_bytes": COLD_FLUSH_BYTES} if cold
                   else {"min_repeat_ms": 1})
        timer = library.time_evaluator(symbol, model.device, number=1, repeat=repeat,
                                       **options)
        return list(timer(*args).results)
    func(*args)
    number = 1 if cold else 10
    flush = np.empty(COLD_FLUSH_BYTES // 8) if cold else None
    times = []
    for _ in range(repeat):
        if flush is not None:
            flush.fill(1.0)
        start = time.perf_counter()
        for _ in range(number):
            func(*args)
        times.append((time.perf_counter() - start) / number)
    return times


def _trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """Mean of ``values`` without the lowest and highest ``cut`` fraction."""
    ordered = sorted(values)
    drop = int(len(ordered) * cut)
    return statistics.fmean(ordered[drop : len(ordered) - drop] or ordered)


def peak_gops(manifest: Mapping) -> dict[str, float]:
    """Peak fp32 GFLOP/s and int8 GOP/s of this host for the artifact's target."""
    features = set(manifest.get("cpu_features", [])) & host_cpu_features()
    arch = manifest.get("arch", "x86_64")
    lanes = 4 if arch == "aarch64" else 16 if "avx512f" in features else 8
    int8_factor = 4 if {"avx512_vnni", "avx_vnni", "asimddp"} & features else 2
    cores = use_every_core()
    fp32 = lanes * 2 * 2 * cores * _clock_ghz()
    return {"fp32": fp32, "fp16": fp32, "int8": fp32 * int8_factor, "int4": fp32 * int8_factor}


def _clock_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except (OSError, ValueError):
        pass
    return 2.0


def top1(model: Model, data: Mapping[str, np.ndarray], source: str = "eval data") -> float:
    """Top-1 accuracy of ``model`` on ``data``: arrays named after the inputs (first axis =
    samples, each sample run alone as the artifact's batch) and integer ``labels``."""
    from .errors import InputError

    if "labels" not in data:
        raise InputError(f"{source} has no 'labels' array; add the true class of each sample")
    labels = np.asarray(data["labels"])
    hits = 0
    for index, label in enumerate(labels):
        feed = {i.name: np.asarray(data[i.name][index : index + 1]) for i in model.inputs
                if i.name in data}
        (scores, *_) = model.run(**feed).values()
        hits += int(np.argmax(scores) == label)
    return hits / max(len(labels), 1)


def write(profile_: Profile, fmt: str, path: str | None = None, baselines=(),
          accuracy: Mapping[str, float] | None = None) -> str:
    """Render a profile (and optional baseline profiles) as table, json, csv or html."""
    from .report import comparison_table, html_report

    if fmt == "json":
        data = profile_.to_json()
        if accuracy:
            data["accuracy"] = dict(accuracy)
        if baselines:
            data["baselines"] = [b.to_json() for b in baselines]
            data["comparison"] = [asdict(r) for r in _pairs(profile_, baselines[0])]
        text = json.dumps(data, indent=2)
    elif fmt == "csv":
        text = profile_.to_csv()
    elif fmt == "html":
        text = html_report(profile_, baselines, dict(accuracy or {}))
    else:
        text = profile_.to_table()
        for baseline in baselines:
            text += "\n\n" + comparison_table(profile_, baseline)
    if path:
        with open(path, "w") as handle:
            handle.write(text)
    return text


def _pairs(profile_: Profile, baseline: Profile):
    from .report import pair_layers

    return pair_layers(profile_, baseline)
