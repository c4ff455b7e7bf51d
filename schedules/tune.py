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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvmq import targets
from tvmq.config import CompileConfig
from tvmq.errors import ConfigError, TuningError

from .intrinsics import register_tensor_intrinsics
from .measure import InProcessBuilder, RPCTracker, XGBModel, make_runner
from .progress import KernelResult, Progress, ProgressCallback, TuneResult, stop_on_ctrl_c
from .records import locked, open_database
from .workloads import Kernel, kernels

__all__ = ["KernelResult", "RPCTracker", "TuneResult", "tune"]

# Candidates measured per search round: each round's records reach the file together, so
# a kill loses at most one round; smaller rounds spend more time searching.
TRIALS_PER_ROUND = 16


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
    runner = make_runner(rpc)
    register_tensor_intrinsics(tune_target)
    start = time.perf_counter()
    with locked(records):
        database = open_database(records)
        stream = sys.stderr if progress else None
        tracker = Progress(found, _budgets(found, trials), records, early_stopping, stream)
        tools = _Tools(InProcessBuilder(), runner, XGBModel(num_tuning_cores=_cores()))
        try:
            with stop_on_ctrl_c(tracker):
                for index, kernel in enumerate(found):
                    remaining = tracker.start(index)
                    if tracker.stop_requested:
                        raise KeyboardInterrupt
                    if remaining:
                        _tune_kernel(kernel, remaining, tune_target, tools, database, tracker)
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


@dataclass(frozen=True)
class _Tools:
    builder: ms.builder.Builder
    runner: ms.runner.Runner
    cost_model: ms.cost_model.CostModel


def _tune_kernel(kernel: Kernel, remaining: int, target, tools: _Tools, database, tracker) -> None:
    seconds = tracker.seconds[tracker.current]
    if not seconds:
        # The default schedule is the first trial: the search starts from it, and a record
        # is only ever applied if it beat the schedule the build would use anyway.
        tracker.add([_measure_default(kernel, target, tools, database)], label="default")
        remaining -= 1
    if remaining > 0 and not _has_search_space(kernel, target, tracker):
        return
    # One scheduler call per round, so early stopping and Ctrl-C act between rounds.
    while remaining > 0 and not tracker.stop_requested and not tracker.stopped(tracker.current):
        batch = min(TRIALS_PER_ROUND, remaining)
        before = len(seconds)
        ms.task_scheduler.TaskScheduler.create("round-robin").tune(
            tasks=[_context(kernel, target, batch)],
            task_weights=[1.0],
            max_trials_global=batch,
            max_trials_per_task=batch,
            num_trials_per_iter=batch,
            builder=tools.builder,
            runner=tools.runner,
            measure_callbacks=[*ms.MeasureCallback.create("default"), ProgressCallback(tracker)],
            database=database,
            cost_model=tools.cost_model,
        )
        if len(seconds) == before:
            return  # the search space has nothing left to try
        remaining -= len(seconds) - before


def _has_search_space(kernel: Kernel, target, tracker) -> bool:
    """Whether meta_schedule's rules can build a search space for the kernel. They cannot
    for tvmq's Winograd kernels (their inverse transform reads the GEMM at constant
    (eps, nu), which ReverseComputeAt's region analysis rejects: "TensorRegion pattern
    match failed"); such a kernel keeps the default schedule just measured, and the run
    goes on to the next kernel instead of dying."""
    try:
        _context(kernel, target, TRIALS_PER_ROUND).generate_design_space()
    except (s_tir.ScheduleError, ValueError) as err:
        reason = str(err).strip().splitlines()[-1][:160]
        tracker.say(f"{kernel.name}: meta_schedule cannot search this kernel ({reason}); "
                    "it keeps its default schedule")
        return False
    return True


def _measure_default(kernel: Kernel, target, tools: _Tools, database) -> float | None:
    """Measure the kernel's default schedule and record it like any tuned one."""
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    from . import default_schedule

    schedule = default_schedule(kernel.workload["main"], target)
    if schedule is None:
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(kernel.workload["main"])
    built = tools.builder.build([ms.builder.BuilderInput(schedule.mod, target)])[0]
    run_secs = None
    if built.error_msg is None:
        device = "cuda" if target.kind.name == "cuda" else "cpu"
        runner_input = ms.runner.RunnerInput(built.artifact_path, device, args)
        run_secs = tools.runner.run([runner_input])[0].result().run_secs
        remove_build_dir(built.artifact_path)
    database.commit_tuning_record(
        ms.database.TuningRecord(
            schedule.trace,
            database.commit_workload(kernel.workload),
            list(run_secs) if run_secs else [1e10],
            target,
            args,
        )
    )
    return sum(float(s) for s in run_secs) / len(run_secs) if run_secs else None


def _context(kernel: Kernel, target: tvm.target.Target, remaining: int) -> ms.TuneContext:
    return ms.TuneContext(
        mod=kernel.workload,
        target=target,
        space_generator="post-order-apply",
        search_strategy=_search(min(TRIALS_PER_ROUND, remaining)),
        task_name=kernel.name,
        num_threads=_cores(),
    ).clone()


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
