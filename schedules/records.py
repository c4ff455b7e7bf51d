"""A tuning records directory: meta_schedule's JSON database, checked, repaired and locked.

The directory holds ``database_workload.json`` (one kernel per line) and
``database_tuning_record.json`` (one measured schedule per line, naming its kernel by line
number), the layout of ``ms.database.JSONDatabase``, which appends and flushes a line per
measurement. A run killed mid-write leaves at most an incomplete last line: the tuner
drops it (with a warning) before appending again, and readers skip it. Anything else that
is not JSON is reported, never guessed at. One tuning run at a time holds ``.lock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tvm.s_tir import meta_schedule as ms

from tvmq.errors import TuningError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LOCK = ".lock"
# What AddToDatabase stores as the latency of a schedule that failed to build or run.
FAILED_SECONDS = 1e9


@dataclass(frozen=True)
class Measurement:
    """One line of the records file: which kernel, and its latency (None if it failed)."""

    workload: int
    seconds: float | None


@contextmanager
def locked(records_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the directory's lock for one tuning run; a second run is refused, not queued."""
    os.makedirs(records_dir, exist_ok=True)
    path = os.path.join(records_dir, LOCK)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            raise TuningError(
                f"records directory '{records_dir}' is being tuned by another tvmq tune "
                f"(pid {pid}); wait for it or use another --records"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def repair(records_dir: str | os.PathLike) -> None:
    """Drop an incomplete last line a killed run left behind, so appending is safe again.

    Call only while holding :func:`locked`.
    """
    for name in (WORKLOADS, RECORDS):
        path = os.path.join(records_dir, name)
        _, good_bytes, dropped = read_lines(path)
        if dropped:
            with open(path, "r+b") as handle:
                handle.truncate(good_bytes)
            warnings.warn(
                f"dropped an incomplete last line from '{path}' (a tuning run was killed "
                "while writing it)",
                stacklevel=2,
            )
    measurements(records_dir)


def measurements(records_dir: str | os.PathLike) -> list[Measurement]:
    """Every measurement in the directory, in the order it was made."""
    workloads, _, _ = read_lines(os.path.join(records_dir, WORKLOADS))
    for number, line in enumerate(workloads, start=1):
        if not (isinstance(line, list) and len(line) == 2 and isinstance(line[1], str)):
            _corrupt(os.path.join(records_dir, WORKLOADS), number, "not a workload entry")
    path = os.path.join(records_dir, RECORDS)
    lines, _, _ = read_lines(path)
    result = []
    for number, line in enumerate(lines, start=1):
        try:
            workload, (_trace, seconds, *_rest) = line
            workload = int(workload)
            mean = sum(float(s) for s in seconds) / len(seconds) if seconds else None
        except (TypeError, ValueError):
            _corrupt(path, number, "not a tuning record")
        if not 0 <= workload < len(workloads):
            _corrupt(path, number, f"names workload {workload} of {len(workloads)}")
        result.append(Measurement(workload, mean if mean and mean < FAILED_SECONDS else None))
    return result


def workload_keys(records_dir: str | os.PathLike) -> list[str]:
    """The structural hash of each workload, in file order (records name them by index)."""
    workloads, _, _ = read_lines(os.path.join(records_dir, WORKLOADS))
    return [str(line[0]) for line in workloads]


def open_database(records_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The directory as a JSONDatabase that appends; call only while holding :func:`locked`."""
    repair(records_dir)
    _register_intrinsics()
    try:
        return ms.database.JSONDatabase(work_dir=str(records_dir))
    except Exception as err:
        raise TuningError(
            f"tuning records in '{records_dir}' do not load into TVM ({_first_line(err)}); "
            "move the directory aside and tune again"
        ) from None


def load_database(records_dir: str | os.PathLike) -> ms.database.MemoryDatabase:
    """A read-only in-memory copy of the directory, safe to take while a tuning run appends.

    Loaded once per process while the files stay the same (every build on a VNNI machine
    reads the shipped records)."""
    stamp = []
    for name in (WORKLOADS, RECORDS):
        try:
            info = os.stat(os.path.join(records_dir, name))
            stamp.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamp.append(None)
    path = os.path.abspath(records_dir)
    cached = _LOADED.get(path)
    if cached is None or cached[0] != stamp:
        cached = _LOADED[path] = (stamp, _load_database(records_dir))
    return cached[1]


# Per directory: the files' (mtime, size) when loaded, and the database.
_LOADED: dict[str, tuple[list, ms.database.MemoryDatabase]] = {}


def _register_intrinsics() -> None:
    # Records of int8 kernels name tvmq's tensor intrinsics; TVM cannot load them before.
    from .int8_dot import register_all

    register_all()


def _load_database(records_dir: str | os.PathLike) -> ms.database.MemoryDatabase:
    _register_intrinsics()
    workload_lines, _, _ = read_lines(os.path.join(records_dir, WORKLOADS))
    record_lines, _, _ = read_lines(os.path.join(records_dir, RECORDS))
    measurements(records_dir)
    database = ms.database.MemoryDatabase()
    try:
        workloads = [ms.database.Workload.from_json(line) for line in workload_lines]
        for workload in workloads:
            database.commit_workload(workload.mod)
        for index, record in record_lines:
            if index < len(workloads):
                workload = workloads[index]
                database.commit_tuning_record(ms.database.TuningRecord.from_json(record, workload))
    except Exception as err:
        raise TuningError(
            f"tuning records in '{records_dir}' do not load into TVM ({_first_line(err)}); "
            "tune again into a new --records directory"
        ) from None
    return database


def read_lines(path: str) -> tuple[list, int, bool]:
    """The parsed lines of a JSON-lines file, the byte length of its complete lines, and
    whether an incomplete last line was left out."""
    if not os.path.exists(path):
        return [], 0, False
    with open(path, "rb") as handle:
        data = handle.read()
    *complete, tail = data.split(b"\n")
    lines, offset = [], 0
    for number, raw in enumerate(complete, start=1):
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                _corrupt(path, number, "not JSON")
        offset += len(raw) + 1
    if not tail.strip():
        return lines, len(data), False
    # Text after the last newline is a line a kill cut short: the writer appends
    # "[...]\n" per record, so only a cut-short record looks like that. Other text is damage.
    if not tail.lstrip().startswith(b"["):
        _corrupt(path, len(complete) + 1, "not JSON")
    return lines, offset, True


def _corrupt(path: str, number: int, what: str) -> None:
    raise TuningError(
        f"tuning records file '{path}' is corrupt at line {number} ({what}); move the "
        "directory aside and tune again into a new --records directory"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:200] if text else type(err).__name__
