"""ApplyTuningRecords: give kernels their tuned schedules, but only ones checked correct.

Runs after FuseTIR and before the default schedules (which then skip every kernel marked
``tirx.is_scheduled``). For each kernel with records in the directory it takes the fastest
measured schedule, runs it against the unscheduled kernel on random inputs
(:mod:`tvmq.schedules.verify`), and keeps it only if the outputs agree; a schedule that
computes something else is dropped with a warning naming the kernel, and the next fastest
is tried. This replaces ``relax.transform.MetaScheduleApplyDatabase``, which trusts every
record.
"""

from __future__ import annotations

import os
import warnings

import tvm
from tvm.s_tir import Schedule

from .intrinsics import register_tensor_intrinsics
from .records import FAILED_SECONDS, load_database
from .verify import check_kernel, runs_here
from .workloads import skeleton_of, workload_of

# How many of a kernel's fastest records are tried before it falls back to its default.
TOP_K = 3
# Each kernel given a tuned schedule says where it came from (the manifest's "schedule").
SCHEDULE_ATTR = "tvmq.schedule"


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
class ApplyTuningRecords:
    """Apply the checked tuning records of ``records_dir`` to the module's kernels.

    Parameters
    ----------
    records_dir : str
        A ``tvmq tune --records`` directory.
    target : tvm.target.Target
        The target the kernels are built for.
    verify : bool
        Check each record on random inputs before using it. Records for a target this
        machine cannot run are then not used at all (with a warning).
    source : str
        What the kernels' ``tvmq.schedule`` attribute says: ``tuned`` (the user's records)
        or ``shipped`` (:mod:`tvmq.schedules.shipped`).
    checked : bool
        The records were each checked on their own kernel when they were made (shipped
        records: ``ab_check`` and tests/test_shipped.py): only those applied to another
        kernel of the same skeleton are checked again.
    """

    def __init__(
        self,
        records_dir: str | os.PathLike,
        target: tvm.target.Target,
        *,
        verify: bool = True,
        source: str = "tuned",
        checked: bool = False,
    ) -> None:
        self.records_dir = str(records_dir)
        self.target = target
        self.verify = verify
        self.source = source
        self.checked = checked

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        register_tensor_intrinsics(self.target)  # records name them: register before loading
        database = load_database(self.records_dir)
        if self.verify and not runs_here(self.target):
            warnings.warn(
                f"tuning records in '{self.records_dir}' cannot be checked on this machine "
                f"(target {self.target.export()} does not run here); kernels keep their default "
                "schedules — compile on the target machine to use them",
                stacklevel=2,
            )
            return mod
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
                continue
            tuned = self._tuned(gv.name_hint, func, database)
            if tuned is not None:
                updates[gv] = tuned
        if not updates:
            return mod
        mod = mod.clone()  # the module a pass is given is not its to change
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    def _tuned(self, name: str, func: tvm.tirx.PrimFunc, database) -> tvm.tirx.PrimFunc | None:
        workload_mod = workload_of(func)
        exact = database.has_workload(workload_mod)
        verify = self.verify and not (self.checked and exact)
        if exact:
            workload = database.commit_workload(workload_mod)
        else:
            # The same kernel calibrated differently (other zero points, clamp bounds).
            workload = _by_skeleton(self.records_dir, database).get(skeleton_of(workload_mod))
            if workload is None:
                return None
        for record in database.get_top_k(workload, TOP_K):
            if not record.run_secs or float(record.run_secs[0]) >= FAILED_SECONDS:
                continue
            try:
                schedule = Schedule(workload_mod)
                record.trace.apply_to_schedule(schedule, remove_postproc=False)
            except Exception:
                warnings.warn(
                    f"a tuning record for kernel '{name}' no longer applies to it; dropped",
                    stacklevel=3,
                )
                continue
            scheduled = schedule.mod["main"]
            if verify:
                check = check_kernel(workload_mod["main"], scheduled, target=self.target, name=name)
                if not check.ok:
                    warnings.warn(
                        f"the tuned schedule of kernel '{name}' computes wrong results "
                        f"({check.detail}); dropped, using the next record or the default",
                        stacklevel=3,
                    )
                    continue
            return _as_replacement(func, scheduled).with_attr(SCHEDULE_ATTR, self.source)
        return None


def _by_skeleton(records_dir: str, database) -> dict:
    """The database's workloads by :func:`skeleton_of`, computed once per loaded database."""
    cached = _SKELETONS.get(records_dir)
    if cached is None or cached[0] is not database:
        index = {}
        for record in database.get_all_tuning_records():
            index.setdefault(skeleton_of(record.workload.mod), record.workload)
        cached = _SKELETONS[records_dir] = (database, index)
    return cached[1]


# Per records directory: the database the index was made from, and the index.
_SKELETONS: dict[str, tuple] = {}


def _is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def _as_replacement(original: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc):
    # The workload was normalized (global symbol "main", tvmq.* attributes dropped): the
    # kernel keeps its own attributes, so lowering and reports see it as before.
    func = scheduled
    if "global_symbol" not in (original.attrs or {}):
        func = func.without_attr("global_symbol")
    for key, value in (original.attrs or {}).items():
        func = func.with_attr(str(key), value)
    return func.with_attr("tirx.is_scheduled", True)
