"""Shipped tuning records: pruned to real gains, matched to targets, checked, applied."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import tvm
from tvm.s_tir import Schedule
from tvmq.schedules.records import RECORDS, WORKLOADS, load_database, measurements, read_lines
from tvmq.schedules.shipped import MIN_GAIN, TUNED_DIR, ship, shipped_records
from tvmq.schedules.tune import tune
from tvmq.schedules.verify import check_kernel

import tvmq
from tvmq import targets

VNNI = targets.resolve("x86-vnni")
needs_vnni = pytest.mark.skipif(not VNNI.runs_here(), reason="needs an AVX-512 VNNI CPU")


def _target(name: str) -> tvm.target.Target:
    return targets.resolve(name).tvm_target()


def test_the_vnni_set_serves_vnni_targets_only():
    vnni = os.path.join(TUNED_DIR, "x86-vnni")
    assert shipped_records(_target("x86-vnni")) == vnni
    assert shipped_records(_target("x86-avx2")) is None  # lacks AVX-512: its kernels differ
    assert shipped_records(_target("aarch64-dotprod")) is None
    assert shipped_records(_target("cuda-sm80")) is None
    if VNNI.runs_here():
        assert shipped_records(_target("x86")) == vnni  # this host has every VNNI feature


def test_ship_keeps_only_records_that_beat_the_default(tiny_model_path, tmp_path):
    source = tmp_path / "tuned"
    tune(tiny_model_path, target="x86", records=source, trials=3, progress=False)
    # One record per kernel, its default; add searched ones with known times (seconds).
    lines, _, _ = read_lines(str(source / RECORDS))
    assert [line[0] for line in lines] == [0, 1, 2]

    def record(workload: int, seconds: list[float]) -> str:
        trace, _, *rest = lines[workload][1]
        return json.dumps([workload, [trace, seconds, *rest]])

    default = {0: 1.0, 1: 1.0, 2: 1.0}
    searched = [
        (0, [0.5]), (0, [0.7]), (0, [0.6]),  # kernel 0: two best kept, fastest first
        (1, [1.0 - MIN_GAIN / 2]),  # kernel 1: within the noise of its default, not shipped
        (2, [1e10]),  # kernel 2: a failed build, never shipped
    ]
    with open(source / RECORDS, "w") as handle:
        for workload, seconds in default.items():
            handle.write(record(workload, [seconds]) + "\n")
        for workload, seconds in searched:
            handle.write(record(workload, seconds) + "\n")

    destination = tmp_path / "shipped"
    assert ship([str(source)], str(destination)) == {"kernels": 3, "beat": 1, "shipped": 1}
    kept = measurements(destination)
    assert [(m.workload, m.seconds) for m in kept] == [(0, 0.5), (0, 0.6)]
    workloads, _, _ = read_lines(str(destination / WORKLOADS))
    original, _, _ = read_lines(str(source / WORKLOADS))
    assert workloads == [original[0]]
    # A second source with a faster record for the same kernel merges into it.
    other = tmp_path / "other"
    other.mkdir()
    (other / WORKLOADS).write_text(json.dumps(original[0]) + "\n")
    (other / RECORDS).write_text(record(0, [2.0]) + "\n" + record(0, [0.4]) + "\n")
    ship([str(source), str(other)], str(destination))
    assert [m.seconds for m in measurements(destination)] == [0.4, 0.5]
    # A fresh comparison that the records lose drops them all.
    counts = ship([str(source)], str(destination), check=lambda workload, record: False)
    assert counts == {"kernels": 3, "beat": 1, "shipped": 0}
    assert measurements(destination) == []


def test_ab_check_times_both_schedules_and_rejects_a_wrong_one(tiny_model_path, tmp_path):
    """The fresh comparison builds the default and the record, checks and times both (on
    a kernel this small the timing verdict is noise); a record that computes something
    else never ships, however fast it claims to be."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms
    from tvmq.schedules.shipped import ab_check

    records = tmp_path / "records"
    tune(tiny_model_path, target="x86", records=records, trials=1, progress=False)
    (workload,), _, _ = read_lines(str(records / WORKLOADS))
    (line,), _, _ = read_lines(str(records / RECORDS))
    said = []
    check = ab_check(_target("x86"), said.append)
    assert isinstance(check(workload, line[1]), bool)
    assert len(said) == 1 and "default" in said[0] and "tuned" in said[0]
    # The conv's accumulator stored as int32: applies cleanly, claims 1 ns, and is wrong.
    loaded = ms.database.Workload.from_json(workload)
    wrong = Schedule(loaded.mod)
    wrong.unsafe_set_dtype(wrong.get_sblock("conv2d_nchw"), 0, "int32")
    record = ms.database.TuningRecord(wrong.trace, loaded, [1e-9], _target("x86"),
                                      ms.arg_info.ArgInfo.from_prim_func(loaded.mod["main"]))
    assert check(workload, record.as_json()) is False
    assert len(said) == 1  # rejected before any timing


@needs_vnni
def test_every_shipped_record_applies_and_computes_its_kernel():
    """What lets a cross build use the shipped records without checking them itself."""
    directory = shipped_records(_target("x86-vnni"))
    database = load_database(directory)
    records = database.get_all_tuning_records()
    assert records, "the x86-vnni set is empty"
    target = _target("x86-vnni")
    for record in records:
        schedule = Schedule(record.workload.mod)
        record.trace.apply_to_schedule(schedule, remove_postproc=False)
        check = check_kernel(record.workload.mod["main"], schedule.mod["main"], target=target)
        assert check.ok, check.detail


@needs_vnni
def test_mobilenet_v2_takes_shipped_schedules_and_stays_right(tmp_path):
    """The benchmark's MobileNetV2 (tuned for the set) gets shipped schedules, exactly where
    its kernels match, and computes what ONNX Runtime does; --no-shipped-records opts out."""
    from conftest import reference, relative_error

    from tvmq.models import mobilenet_v2

    model = mobilenet_v2()
    path = tmp_path / "mobilenet_v2.onnx"
    onnx.save(model, path)
    artifact = tvmq.compile(str(path), target="x86")
    schedules = [k["schedule"] for k in artifact.manifest["kernels"].values()]
    assert schedules.count("shipped") >= 1
    assert set(schedules) <= {"shipped", "default"}
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    artifact.export(tmp_path / "m.tar")
    (actual,) = tvmq.runtime.load(tmp_path / "m.tar").run(input=x).values()
    assert relative_error(actual, reference(model, {"input": x})[0]) < 1e-4

    config = tvmq.CompileConfig(shipped_records=False)
    names = [p.info.name for p in tvmq.pipeline("x86", config)]
    assert "ApplyTuningRecords" not in names


def test_int8_records_serve_a_build_calibrated_on_other_data(tiny_model_path, tmp_path):
    """An INT8 kernel's zero points and clamp bounds are immediates that calibration chooses:
    records tuned under one calibration still apply under another (by skeleton), checked."""
    from tvmq.schedules.workloads import kernels, skeleton_of

    def calibration(seed: int, scale: float):
        rng = np.random.default_rng(seed)
        return [{"x": (rng.normal(size=(1, 1, 8, 8)) * scale + scale).astype(np.float32)}
                for _ in range(4)]

    tuned_on = tvmq.CompileConfig(quantize="int8", calibration_data=calibration(0, 1.0))
    built_on = tvmq.CompileConfig(quantize="int8", calibration_data=calibration(1, 3.0))
    records = tmp_path / "records"
    result = tune(tiny_model_path, target="x86", records=records, trials=8, config=tuned_on,
                  progress=False)

    def fused(config):
        from tvmq.schedules.tune import _fused

        return kernels(_fused(tiny_model_path, targets.resolve("x86"), config, None))

    mine, theirs = fused(tuned_on), fused(built_on)
    assert {k.key for k in theirs} - {k.key for k in mine}  # some match by skeleton only
    assert {skeleton_of(k.workload) for k in mine} == {skeleton_of(k.workload) for k in theirs}

    artifact = tvmq.compile(tiny_model_path, target="x86", tuning_records=str(records),
                            shipped_records=False, quantize="int8",
                            calibration_data=calibration(1, 3.0))
    schedules = {name: k["schedule"] for name, k in artifact.manifest["kernels"].items()}
    tuned = [name for name, s in schedules.items() if s == "tuned"]
    assert all(k.best_ms is not None for k in result.kernels)
    assert len(tuned) >= len(theirs)  # every kernel worth tuning took its record
    x = calibration(2, 3.0)[0]["x"]
    artifact.export(tmp_path / "m.tar")
    untuned = tvmq.compile(tiny_model_path, target="x86", shipped_records=False,
                           quantize="int8", calibration_data=calibration(1, 3.0))
    untuned.export(tmp_path / "u.tar")
    (got,) = tvmq.runtime.load(tmp_path / "m.tar").run(x=x).values()
    (want,) = tvmq.runtime.load(tmp_path / "u.tar").run(x=x).values()
    np.testing.assert_array_equal(got, want)  # integer kernels: a schedule changes nothing


@needs_vnni
def test_int8_records_load_in_a_fresh_process(tmp_path):
    """Records of tensorized int8 kernels name tvmq's intrinsics: a later compile or a
    resumed run (a new process, before any schedule rule registered them) loads them."""
    import subprocess
    import sys

    from tvmq.examples import DIGITS_MODEL, digits_calibration_set

    images, _ = digits_calibration_set()
    config = tvmq.CompileConfig(quantize="int8",
                                calibration_data=[{"input": i[None]} for i in images[:8]])
    records = tmp_path / "records"
    tune(DIGITS_MODEL, target="x86-vnni", records=records, trials=2, config=config,
         progress=False)
    assert "tvmq_u8s8" in (records / RECORDS).read_text()  # a VNNI kernel was measured
    code = ("import sys; from tvmq.schedules.records import load_database, open_database; "
            "print(len(load_database(sys.argv[1]).get_all_tuning_records())); "
            "open_database(sys.argv[1])")
    loaded = subprocess.run([sys.executable, "-c", code, str(records)], capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert int(loaded.stdout.split()[-1]) == 2
