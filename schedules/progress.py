"""Tuning progress: trial counts, best latencies and the ETA, one line per measured round.

``Progress`` is the tuner's bookkeeping per kernel (measured latencies in order, read back
from the records directory on a rerun); meta_schedule feeds it through ``ProgressCallback``
after each round, which is also where early stopping and a Ctrl-C end a kernel's search.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .records import measurements, workload_keys


@dataclass(frozen=True)
class KernelResult:
    """Where one kernel stands after a run."""

    name: str
    trials: int
    budget: int
    best_ms: float | None
    measured_now: int


@dataclass(frozen=True)
class TuneResult:
    """What ``tune`` did: per kernel, and the wall time it took."""

    records: str
    kernels: tuple[KernelResult, ...]
    seconds: float

    @property
    def measured_now(self) -> int:
        return sum(k.measured_now for k in self.kernels)


class Progress:
    """Trial counts, best latencies and the ETA; one line per measured round."""

    def __init__(self, found, budgets, records, early_stopping, stream) -> None:
        self.found, self.budgets, self.records = found, budgets, records
        self.early_stopping, self.stream = early_stopping, stream
        index_of = {key: index for index, key in enumerate(workload_keys(records))}
        self.seconds: list[list[float | None]] = [[] for _ in found]
        for measurement in measurements(records):
            for index, kernel in enumerate(found):
                if index_of.get(kernel.key) == measurement.workload:
                    self.seconds[index].append(measurement.seconds)
        self.before = [len(s) for s in self.seconds]
        self.started = time.perf_counter()
        self.current = 0
        self.stop_requested = False

    def start(self, index: int) -> int:
        """Trials kernel ``index`` still has to run (0: skip it, and say why)."""
        self.current = index
        done, budget = len(self.seconds[index]), self.budgets[index]
        if done >= budget:
            self._line(f"{done}/{budget} trials already measured, skipped")
            return 0
        if self.stopped(index):
            self._line(f"no better schedule in {self.early_stopping} trials, stopped earlier")
            return 0
        return budget - done

    def stopped(self, index: int) -> bool:
        if self.early_stopping is None:
            return False
        seconds = self.seconds[index]
        valid = [(s, i) for i, s in enumerate(seconds) if s is not None]
        best_at = min(valid)[1] if valid else -1
        return len(seconds) - 1 - best_at >= self.early_stopping

    def add(self, results: Sequence[float | None], label: str = "") -> bool:
        """Record a round; True when the kernel should stop early (``early_stopping``)."""
        self.seconds[self.current].extend(results)
        done, budget = len(self.seconds[self.current]), self.budgets[self.current]
        bar = _bar(done, budget)
        self._line(f"{bar} {done}/{budget}  {self._eta()}" + (f"  ({label})" if label else ""))
        return self.stopped(self.current)

    def result(self, seconds: float) -> TuneResult:
        kernels = tuple(
            KernelResult(
                kernel.name,
                len(self.seconds[index]),
                self.budgets[index],
                self._best_ms(index),
                len(self.seconds[index]) - self.before[index],
            )
            for index, kernel in enumerate(self.found)
        )
        return TuneResult(self.records, kernels, seconds)

    def _best_ms(self, index: int) -> float | None:
        valid = [s for s in self.seconds[index] if s is not None]
        return min(valid) * 1e3 if valid else None

    def _eta(self) -> str:
        measured = sum(len(s) for s in self.seconds) - sum(self.before)
        left = sum(
            max(budget - len(s), 0) for budget, s in zip(self.budgets, self.seconds, strict=True)
        )
        elapsed = time.perf_counter() - self.started
        eta = _clock(elapsed / measured * left) if measured else "?"
        total = sum(self.budgets)
        return f"all {total - left}/{total}  {_clock(elapsed)} elapsed  ETA {eta}"

    def say(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(f"tune: {text}\n")
            self.stream.flush()

    def _line(self, text: str) -> None:
        if self.stream is None:
            return
        index = self.current
        best = self._best_ms(index)
        best_text = f"best {best:.4g} ms" if best is not None else "best -"
        self.stream.write(
            f"tune [{index + 1}/{len(self.found)}] {self.found[index].name}  {best_text}  {text}\n"
        )
        self.stream.flush()


@derived_object
class ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Feeds each measured round to the progress tracker.

    It never ends a task itself: a ``terminate_task`` from inside a callback races the
    scheduler's own bookkeeping (a failed check in C++). The driver runs one round per
    scheduler call and decides between rounds.
    """

    def __init__(self, tracker: Progress) -> None:
        self.tracker = tracker

    def apply(self, _task_scheduler, _task_id, _candidates, _builder_results, runner_results):
        self.tracker.add(
            [
                sum(float(s) for s in r.run_secs) / len(r.run_secs) if r.run_secs else None
                for r in runner_results
            ]
        )


def _bar(done: int, budget: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(budget, 1)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextmanager
def stop_on_ctrl_c(tracker: Progress) -> Iterator[None]:
    """The first Ctrl-C stops after the round being measured, whose records then reach the
    file; a second one ends the process at once, as a kill would. (A KeyboardInterrupt
    raised inside meta_schedule's C++ loop can abort the interpreter.)"""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def handler(_signum, _frame):
        if tracker.stop_requested:
            tracker.say("stopped at once; the records file keeps every finished round")
            os._exit(130)
        tracker.stop_requested = True
        tracker.say("stopping after this round (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
