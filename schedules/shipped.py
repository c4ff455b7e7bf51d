"""Shipped tuning records: schedules tuned once for a preset, applied to every build it fits.

``schedules/tuned/<preset>/`` holds a records directory (the layout of
:mod:`tvmq.schedules.records`) made by ``scripts/ship_records.py``: the benchmark models
tuned with ``tvmq tune --target <preset>``, pruned to the kernels whose tuned
schedule beat their default schedule by at least ``MIN_GAIN`` (each kernel's first record
is its default, measured by the tuner before the search). A build whose target has every
CPU feature of the preset (``x86`` on a VNNI machine fits ``x86-vnni``) applies them to
the kernels that match a shipped workload exactly, after the user's own
``--tuning-records``; like those, each is checked on random inputs first when the target
runs here. ``--no-shipped-records`` leaves them out. This is TVM's old TopHub, made from
our own kernels.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import tvm

from .records import RECORDS, WORKLOADS, measurements, read_lines

__all__ = ["MIN_GAIN", "TUNED_DIR", "ship", "shipped_records"]

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
# A tuned schedule ships only if it beat the default by this fraction of the default's
# time: tuning measurements repeat a few runs, and smaller gains are within their noise.
MIN_GAIN = 0.05
# Records kept per shipped kernel, fastest first: the next is used if one fails its check.
KEEP = 2


def shipped_records(target: tvm.target.Target) -> str | None:
    """The shipped records directory for a target: the preset with the most CPU features
    that the target has all of, on the same architecture (None if no set fits)."""
    from tvmq.targets.preset import TargetPreset

    from tvmq import targets

    if target.kind.name != "llvm" or not os.path.isdir(TUNED_DIR):
        return None
    wanted = TargetPreset("custom", copy.deepcopy(dict(target.export())), "")
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


def ship(sources: Sequence[str], destination: str) -> dict[str, int]:
    """Write to ``destination`` the records of ``sources`` that beat their kernel's default.

    Each source is a ``tvmq tune --records`` directory; a kernel's first record there is
    its default schedule. A kernel tuned in several sources keeps its fastest records.
    Returns counts: kernels seen, kernels shipped.
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
            good = sorted((s, r) for s, r in tried[1:] if s is not None)
            if default is None or not good or good[0][0] > default * (1 - MIN_GAIN):
                continue
            _, kept = chosen.get(key, (None, []))
            merged = sorted(kept + good, key=lambda item: item[0])[:KEEP]
            chosen[key] = (workloads[index], merged)
    os.makedirs(destination, exist_ok=True)
    with open(os.path.join(destination, WORKLOADS), "w") as out_workloads, open(
        os.path.join(destination, RECORDS), "w"
    ) as out_records:
        for number, (workload, kept) in enumerate(chosen.values()):
            out_workloads.write(json.dumps(workload) + "\n")
            for _, record in kept:
                out_records.write(json.dumps([number, record]) + "\n")
    return {"kernels": len(seen), "shipped": len(chosen)}
