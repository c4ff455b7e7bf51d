"""Shipped tuning records: schedules tuned once for a preset, applied to every build it fits.

``schedules/tuned/<preset>/`` holds a records directory (the layout of
:mod:`tvmq.schedules.records`) made by ``scripts/ship_records.py``: the benchmark models
tuned with ``tvmq tune --target <preset>``, pruned to the kernels whose tuned
schedule beat their default schedule by at least ``MIN_GAIN`` (each kernel's first record
is its default, measured by the tuner before the search) and again when both are timed
afresh side by side (``ab_check``). A build whose target has every CPU feature of the
preset (``x86`` on a VNNI machine fits ``x86-vnni``) applies them to the kernels that match
a shipped workload (exactly, or by skeleton: ``schedules/workloads.py``), after the user's own
``--tuning-records``; like those, each is checked on random inputs first when the target
runs here. ``--no-shipped-records`` leaves them out. This is TVM's old TopHub, made from
our own kernels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import tvm

from .records import RECORDS, WORKLOADS, measurements, read_lines

__all__ = ["MIN_GAIN", "TUNED_DIR", "ab_check", "ship", "shipped_records"]

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
# A tuned schedule ships only if it beat the default by this fraction of the default's
# time: tuning measurements repeat a few runs, and smaller gains are within their noise.
MIN_GAIN = 0.05
# Records kept per shipped kernel, fastest first: the next is used if one fails its check.
KEEP = 2
# A fresh comparison (``ab_check``) times each schedule this many times, alternating.
AB_ROUNDS = 5


def shipped_records(target: tvm.target.Target) -> str | None:
    """The shipped records directory for a target: the preset with the most CPU features
    that the target has all of, on the same architecture (None if no set fits)."""
    from tvmq.targets.preset import TargetPreset

    from tvmq import targets

    if target.kind.name != "llvm" or not os.path.isdir(TUNED_DIR):
        return None
    wanted = TargetPreset.of(target)
    has = set(wanted.required_cpu_features())
    best, best_features = None, -1
    for name in sorted(os.listdir(TUNED_DIR)):
        path = os.path.join(TUNED_DIR, name)
        if name not in targets.PRESETS or not os.path.isfile(os.path.join(path, RECORDS)):
            continue
        preset = targets.PRESETS[name]
        needs = set(preset.required_cpu_features())
        if preset.arch == wanted.arch and needs <= has and len(needs) > best_features:
            best, best_features = path, len(needs)
    return best


def ship(sources: Sequence[str], destination: str,
         check: Callable[[list, list], bool] | None = None) -> dict[str, int]:
    """Write to ``destination`` the records of ``sources`` that beat their kernel's default.

    Each source is a ``tvmq tune --records`` directory; a kernel's first record there is
    its default schedule. A kernel tuned in several sources keeps its fastest records.
    ``check(workload line, record)``, if given, must also pass for each record kept (a
    fresh timing against the default: ``ab_check``), since a tuning measurement taken
    while the machine was busy can make a default look slow. Returns counts: kernels seen,
    kernels that beat their default in tuning, kernels shipped.
    """
    chosen: dict[str, tuple[list, list]] = {}  # workload hash -> (workload line, records)
    seen = set()
    for source in sources:
        workloads, _, _ = read_lines(os.path.join(source, WORKLOADS))
        records, _, _ = read_lines(os.path.join(source, RECORDS))
        timed = measurements(source)  # validates both files
        by_workload: dict[int, list[tuple[float | None, list]]] = {}
        for line, measured in zip(records, timed, strict=True):
            by_workload.setdefault(measured.workload, []).append((measured.seconds, line[1]))
        for index, tried in by_workload.items():
            key = str(workloads[index][0])
            seen.add(key)
            default = tried[0][0]
            good = sorted(((s, r) for s, r in tried[1:] if s is not None),
                          key=lambda item: item[0])
            if default is None or not good or good[0][0] > default * (1 - MIN_GAIN):
                continue
            _, kept = chosen.get(key, (None, []))
            merged = sorted(kept + good, key=lambda item: item[0])[:KEEP]
            chosen[key] = (workloads[index], merged)
    beat = len(chosen)
    if check is not None:
        for key, (workload, kept) in list(chosen.items()):
            kept = [(s, r) for s, r in kept if check(workload, r)]
            if kept:
                chosen[key] = (workload, kept)
            else:
                del chosen[key]
    os.makedirs(destination, exist_ok=True)
    with open(os.path.join(destination, WORKLOADS), "w") as out_workloads, open(
        os.path.join(destination, RECORDS), "w"
    ) as out_records:
        for number, (workload, kept) in enumerate(chosen.values()):
            out_workloads.write(json.dumps(workload) + "\n")
            for _, record in kept:
                out_records.write(json.dumps([number, record]) + "\n")
    return {"kernels": len(seen), "beat": beat, "shipped": len(chosen)}


def ab_check(target: tvm.target.Target, log: Callable[[str], None] | None = None):
    """``check(workload line, record)`` for :func:`ship`: build the kernel with its default
    schedule and with the record's, time both on random inputs here, alternating
    ``AB_ROUNDS`` times, and pass the record if its median beats the default's by
    ``MIN_GAIN`` and it computes the same (:func:`tvmq.schedules.verify.check_kernel`)."""
    import statistics

    import numpy as np
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from . import default_schedule
    from .intrinsics import register_tensor_intrinsics
    from .verify import build_kernel, check_kernel, random_buffers

    register_tensor_intrinsics(target)

    def timer(func):
        tensors = [tvm.runtime.tensor(a) for a in random_buffers(func)]
        evaluate = build_kernel(func, target).time_evaluator(
            "main", tvm.cpu(), number=10, repeat=1, min_repeat_ms=20)
        return lambda: evaluate(*tensors).mean * 1e3

    def check(workload_line: list, record: list) -> bool:
        workload = ms.database.Workload.from_json(workload_line)
        func = workload.mod["main"]
        default = default_schedule(func, target)
        tuned = Schedule(workload.mod)
        ms.database.TuningRecord.from_json(record, workload).trace.apply_to_schedule(
            tuned, remove_postproc=False)
        if default is None or not check_kernel(func, tuned.mod["main"], target=target).ok:
            return False
        time_default, time_tuned = timer(default.mod["main"]), timer(tuned.mod["main"])
        rounds = [(time_default(), time_tuned()) for _ in range(AB_ROUNDS)]
        ms_default = statistics.median(d for d, _ in rounds)
        ms_tuned = statistics.median(t for _, t in rounds)
        keep = bool(np.isfinite(ms_tuned) and ms_tuned < ms_default * (1 - MIN_GAIN))
        if log is not None:
            shapes = " x ".join(str([int(d) for d in p.shape]) for p in func.params[:2])
            log(f"{'ship' if keep else 'drop'} kernel of {shapes}: default {ms_default:.4f} "
                f"ms, tuned {ms_tuned:.4f} ms")
        return keep

    return check
