"""The tuning driver: meta_schedule over a model's kernels, resumable, locally or over RPC.

``tune`` runs the build pipeline up to and including FuseTIR (the same graph passes, so
the kernels tuned are exactly the kernels the build schedules), then tunes each kernel in
turn with meta_schedule's evolutionary search and XGBoost cost model, appending every
measurement to a records directory (:mod:`tvmq.schedules.records`). A second run on the
same directory counts what each kernel already has and continues; ``tvmq compile
--tuning-records DIR`` applies the records through :class:`ApplyTuningRecords`, which
checks each one first. Measurements run on this machine, or on the RPC servers registered
with a TVM tracker (``python -m tvm.exec.rpc_tracker`` / ``rpc_server``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from tvmq import targets
from tvmq.config import CompileConfig
from tvmq.errors import ConfigError, TuningError

from .intrinsics import register_tensor_intrinsics
from .records import locked, measurements, open_database, workload_keys
from .workloads import Kernel, kernels

# Candidates measured per search round: each round's records reach the file together, so
# a kill loses at most one round; smaller rounds spend more time searching.
TRIALS_PER_ROUND = 16
_EVALUATOR = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100)


@dataclass(frozen=True)
class RPCTracker:
    """``--rpc-tracker HOST:PORT --rpc-key KEY``: measure on the servers of a TVM tracker."""

    host: str
    port: int
    key: str
    session_timeout_s: int = 60

    @classmethod
    def parse(cls, address: str, key: str) -> RPCTracker:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"--rpc-tracker {address!r} is not HOST:PORT (e.g. 127.0.0.1:9190)"
            )
        if not key:
            raise ConfigError("--rpc-tracker needs --rpc-key, the key its servers registered")
        return cls(host, int(port), key)


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


def tune(
    model: str | os.PathLike | tvm.IRModule,
    *,
    target: str | Mapping[str, Any] | targets.TargetPreset = "x86",
    records: str | os.PathLike,
    trials: int,
    early_stopping: int | None = None,
    rpc: RPCTracker | None = None,
    config: CompileConfig | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune a model's kernels for a target, appending measurements to ``records``.

    Parameters
    ----------
    model : path or IRModule
        An ``.onnx`` file, or a module from :func:`tvmq.load`.
    target : str, dict or TargetPreset
        A preset name (``tvmq targets``) or a TVM target dict.
    records : path
        The records directory; created if missing, continued if it has records.
    trials : int
        Measurements in all, shared evenly by the kernels (the largest get the remainder).
        A kernel that already has its share is skipped.
    early_stopping : int, optional
        Stop a kernel after this many measurements without a new best.
    rpc : RPCTracker, optional
        Measure on the tracker's servers instead of this machine.
    config : CompileConfig, optional
        The graph passes to tune after (quantization, disabled passes).
    input_shapes : mapping, optional
        Static shapes for inputs with symbolic dimensions (only with a file path).
    progress : bool
        Write a line per measured round to stderr: kernel, trials, best latency, ETA.
    """
    if trials < 1:
        raise ConfigError(f"--trials {trials} must be at least 1")
    if early_stopping is not None and early_stopping < 1:
        raise ConfigError(f"--early-stopping {early_stopping} must be at least 1")
    records = str(records)
    preset = targets.resolve(target)
    tune_target = _tuning_target(preset.tvm_target())
    found = kernels(_fused(model, preset, config or CompileConfig(), input_shapes))
    if not found:
        raise TuningError("the model has no kernels to tune (every kernel is a reshape or view)")
    runner = _runner(rpc)
    register_tensor_intrinsics(tune_target)
    start = time.perf_counter()
    with locked(records):
        database = open_database(records)
        stream = sys.stderr if progress else None
        tracker = _Progress(found, _budgets(found, trials), records, early_stopping, stream)
        cost_model = _XGBModel(num_tuning_cores=_cores())
        builder = _Builder()
        try:
            with _stop_on_ctrl_c(tracker):
                for index, kernel in enumerate(found):
                    remaining = tracker.start(index)
                    if tracker.stop_requested:
                        raise KeyboardInterrupt
                    if remaining:
                        scheduler = ms.task_scheduler.TaskScheduler.create("round-robin")
                        scheduler.tune(
                            tasks=[_context(kernel, tune_target, remaining)],
                            task_weights=[1.0],
                            max_trials_global=remaining,
                            max_trials_per_task=remaining,
                            num_trials_per_iter=min(TRIALS_PER_ROUND, remaining),
                            builder=builder,
                            runner=runner,
                            measure_callbacks=[
                                *ms.MeasureCallback.create("default"),
                                _Callback(tracker),
                            ],
                            database=database,
                            cost_model=cost_model,
                        )
                if tracker.stop_requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            tracker.say(
                f"interrupted: every measured round is kept in '{records}'; run the same "
                "command again to continue"
            )
            raise
    return tracker.result(time.perf_counter() - start)


def _fused(model, preset, config: CompileConfig, input_shapes) -> tvm.IRModule:
    """The module after the build's graph passes, up to and including FuseTIR."""
    from tvmq.build import run_passes
    from tvmq.frontend import load
    from tvmq.pipeline import pass_name, pipeline

    passes = pipeline(preset, config)
    names = [pass_name(p) for p in passes]
    if "FuseTIR" not in names:
        raise ConfigError("tuning needs the FuseTIR pass; do not pass --disabled-pass FuseTIR")
    last = len(names) - 1 - names[::-1].index("FuseTIR")
    mod = model if isinstance(model, tvm.IRModule) else load(model, input_shapes)
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        return run_passes(mod, passes[: last + 1])


def _context(kernel: Kernel, target: tvm.target.Target, remaining: int) -> ms.TuneContext:
    return ms.TuneContext(
        mod=kernel.workload,
        target=target,
        space_generator="post-order-apply",
        search_strategy=_search(min(TRIALS_PER_ROUND, remaining)),
        task_name=kernel.name,
        num_threads=_cores(),
    ).clone()


@contextmanager
def _stop_on_ctrl_c(tracker: _Progress) -> Iterator[None]:
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


def _search(per_round: int) -> ms.search_strategy.EvolutionarySearch:
    # meta_schedule evolves 512 candidates to pick 64 per round; keep that ratio, so a
    # kernel with a handful of trials does not pay for a search sized for hundreds.
    population = min(512, max(32, 8 * per_round))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2)
    )


def _tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    # meta_schedule's CPU rules size parallel loops by the target's core count.
    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    return tvm.target.Target({**target.export(), "num-cores": _cores()})


def _cores() -> int:
    return ms.utils.cpu_count(logical=False)


def _budgets(found: Sequence[Kernel], trials: int) -> list[int]:
    # Kernels come largest first, so the remainder goes to the ones that matter most.
    share, extra = divmod(trials, len(found))
    return [share + (1 if index < extra else 0) for index in range(len(found))]


def _runner(rpc: RPCTracker | None) -> ms.runner.Runner:
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=_EVALUATOR)
    servers = _free_servers(rpc)
    config = ms.runner.RPCConfig(
        tracker_host=rpc.host,
        tracker_port=rpc.port,
        tracker_key=rpc.key,
        session_timeout_sec=rpc.session_timeout_s,
    )
    return ms.runner.RPCRunner(config, _EVALUATOR, max_workers=servers)


def _free_servers(rpc: RPCTracker) -> int:
    """How many servers the tracker has for ``rpc.key``; refuses to start with none."""
    try:
        socket.create_connection((rpc.host, rpc.port), timeout=5).close()
        summary = tvm.rpc.connect_tracker(rpc.host, rpc.port).summary()
    except Exception as err:
        raise TuningError(
            f"cannot reach the RPC tracker at {rpc.host}:{rpc.port} ({err}); start it with "
            f"'python -m tvm.exec.rpc_tracker --host {rpc.host} --port {rpc.port}' or fix "
            "--rpc-tracker"
        ) from None
    free = summary.get("queue_info", {}).get(rpc.key, {}).get("free", 0)
    if free < 1:
        raise TuningError(
            f"the RPC tracker at {rpc.host}:{rpc.port} has no free server with key "
            f"'{rpc.key}'; start one with 'python -m tvm.exec.rpc_server --tracker "
            f"{rpc.host}:{rpc.port} --key {rpc.key}'"
        )
    return int(free)


@derived_object
class _Builder(ms.builder.PyBuilder):
    """Builds candidates in this process.

    LocalBuilder starts a fresh process pool for every round, and each worker imports TVM
    and every tensor intrinsic (seconds to minutes on a busy 2-core machine) to compile
    kernels that take milliseconds. A candidate that crashes the compiler ends the run;
    its records so far are kept and the next run continues.
    """

    def build(self, build_inputs):
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.support.tar import tar

        results = []
        for build_input in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(build_input.mod)
                library = tvm.tirx.build(mod, target=build_input.target)
                path = os.path.join(tempfile.mkdtemp(prefix="tvmq-tune-"), "kernel.tar")
                library.export_library(path, fcompile=tar)
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as err:
                results.append(ms.builder.BuilderResult(None, f"build failed: {err}"))
        return results


@derived_object
class _XGBModel(ms.cost_model.XGBModel._cls):
    """meta_schedule's XGBoost cost model, not trained while its predictions go unused.

    XGBModel predicts at random until it holds ``num_warmup_samples`` measurements but
    retrains after every round regardless (seconds each); training starts once the data
    would be used.
    """

    def update(self, context, candidates, results) -> None:
        warming = self.data_size + len(candidates) < self.num_warmup_samples
        saved = self.adaptive_training, self.last_train_size
        if warming:
            # XGBModel skips a retrain when little data arrived since the last one.
            self.adaptive_training, self.last_train_size = True, float("inf")
        try:
            super().update(context, candidates, results)
        finally:
            if warming:
                self.adaptive_training, self.last_train_size = saved


class _Progress:
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

    def add(self, results: Sequence[float | None]) -> bool:
        """Record a round; True when the kernel should stop early."""
        self.seconds[self.current].extend(results)
        done, budget = len(self.seconds[self.current]), self.budgets[self.current]
        bar = _bar(done, budget)
        self._line(f"{bar} {done}/{budget}  {self._eta()}")
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
class _Callback(ms.measure_callback.PyMeasureCallback):
    """Feeds each measured round to the progress tracker, and applies early stopping."""

    def __init__(self, tracker: _Progress) -> None:
        self.tracker = tracker

    def apply(self, task_scheduler, task_id, _candidates, _builder_results, runner_results):
        results = [
            sum(float(s) for s in r.run_secs) / len(r.run_secs) if r.run_secs else None
            for r in runner_results
        ]
        if self.tracker.add(results) or self.tracker.stop_requested:
            task_scheduler.terminate_task(task_id)


def _bar(done: int, budget: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(budget, 1)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

