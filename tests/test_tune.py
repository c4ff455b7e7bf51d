"""tvmq tune: resumable meta_schedule runs, the records directory, checked records, RPC."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tvm
from conftest import conv_relu_model, reference, relative_error, tiny_cnn
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvmq.schedules.progress import Progress
from tvmq.schedules.records import RECORDS, load_database, locked, measurements, open_database
from tvmq.schedules.tune import RPCTracker, tune
from tvmq.schedules.workloads import Kernel

import tvmq
from tvmq.cli import main
from tvmq.errors import ConfigError, TuningError

# The tiny CNN has three kernels worth tuning (conv+bias+ReLU, mean, dense); its flatten is
# a reshape, which the build turns into a view.
KERNELS = 3


@pytest.fixture(scope="module")
def tuned(tiny_model_path, tmp_path_factory):
    """One measurement per kernel, shared by the tests that only read it."""
    records = tmp_path_factory.mktemp("tuned") / "records"
    result = tune(tiny_model_path, target="x86", records=records, trials=KERNELS, progress=False)
    return str(records), result


def _copy(records: str, tmp_path) -> str:
    target = tmp_path / "records"
    shutil.copytree(records, target)
    os.remove(target / ".lock")
    return str(target)


def test_tune_measures_each_kernel_and_reports_progress(tiny_model_path, tmp_path, capsys):
    result = tune(tiny_model_path, target="x86", records=tmp_path / "r", trials=KERNELS)
    assert len(result.kernels) == KERNELS
    assert [k.trials for k in result.kernels] == [1] * KERNELS
    assert all(k.best_ms is not None and k.best_ms > 0 for k in result.kernels)
    assert len(measurements(tmp_path / "r")) == KERNELS
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == KERNELS
    assert lines[0].startswith(f"tune [1/{KERNELS}] fused_conv2d")
    assert "best " in lines[0] and "1/1" in lines[0] and "ETA" in lines[0]


def test_rerun_measures_nothing_and_a_larger_budget_continues(tuned, tiny_model_path, tmp_path):
    records = _copy(tuned[0], tmp_path)
    again = tune(tiny_model_path, records=records, trials=KERNELS, progress=False)
    assert again.measured_now == 0
    assert len(measurements(records)) == KERNELS
    more = tune(tiny_model_path, records=records, trials=2 * KERNELS, progress=False)
    assert [k.measured_now for k in more.kernels] == [1] * KERNELS
    assert [k.trials for k in more.kernels] == [2] * KERNELS
    assert len(measurements(records)) == 2 * KERNELS


def test_compile_with_records_applies_them_and_matches_onnxruntime(tuned, tiny_model_path):
    records, _ = tuned
    config = tvmq.CompileConfig(tuning_records=records)
    passes = tvmq.pipeline("x86", config)
    names = [p.info.name for p in passes]
    assert "ApplyTuningRecords" in names
    assert names.index("ApplyTuningRecords") < names.index("ApplyDefaultSchedule")
    cut = names.index("ApplyTuningRecords") + 1
    with tvm.target.Target(tvmq.targets.resolve("x86").target), tvm.transform.PassContext(3):
        mod = tvm.transform.Sequential(passes[:cut])(tvmq.load(tiny_model_path))
    scheduled = [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)
    ]
    assert len(scheduled) == KERNELS

    x = np.random.default_rng(1).normal(size=(1, 1, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every record here is correct: none is dropped
        artifact = tvmq.compile(tiny_model_path, target="x86", tuning_records=records)
    (actual,) = _run(artifact, x)
    assert relative_error(actual, reference(tiny_cnn(), {"x": x})[0]) < 1e-4


def _winograd_model():
    return conv_relu_model(16, 28, seed=2)


def test_a_kernel_meta_schedule_cannot_search_keeps_its_default(tmp_path, capsys):
    # The 28x28 3x3 layer is a Winograd kernel by default; meta_schedule's rules fail on
    # it. The run must record its default, say so, and go on (it used to die).
    import onnx

    path = str(tmp_path / "winograd.onnx")
    onnx.save(_winograd_model(), path)
    result = tune(path, target="x86", records=tmp_path / "r", trials=4)
    (kernel,) = result.kernels
    assert "winograd" in kernel.name and kernel.trials == 1 and kernel.best_ms > 0
    assert "cannot search this kernel" in capsys.readouterr().err
    artifact = tvmq.compile(path, target="x86", tuning_records=str(tmp_path / "r"))
    x = np.random.default_rng(3).random((1, 16, 28, 28), dtype=np.float32)
    (actual,) = _run(artifact, x)
    assert relative_error(actual, reference(_winograd_model(), {"x": x})[0]) < 1e-4


def test_a_wrong_record_is_dropped_and_the_output_stays_right(tuned, tiny_model_path, tmp_path):
    records = _copy(tuned[0], tmp_path)
    with locked(records):
        database = open_database(records)
        conv = next(
            r for r in database.get_all_tuning_records() if "conv2d" in r.workload.mod.script()
        )
        # A schedule that applies cleanly but stores the conv accumulator as int32: fast
        # (it claims 1 ns), plausible, and wrong, like a tensorization on the wrong layout.
        schedule = Schedule(conv.workload.mod)
        schedule.unsafe_set_dtype(schedule.get_sblock("conv2d_nchw"), 0, "int32")
        database.commit_tuning_record(
            ms.database.TuningRecord(
                schedule.trace, conv.workload, [1e-9], conv.target, conv.args_info
            )
        )
    with pytest.warns(UserWarning, match=r"tuned schedule of kernel 'fused_conv2d\w*' computes "
                      r"wrong results \(buffer \d differs by"):
        artifact = tvmq.compile(tiny_model_path, target="x86", tuning_records=records)
    x = np.random.default_rng(2).normal(size=(1, 1, 8, 8)).astype(np.float32)
    (actual,) = _run(artifact, x)
    assert relative_error(actual, reference(tiny_cnn(), {"x": x})[0]) < 1e-4


def test_kill_leaves_a_database_that_loads_and_a_rerun_completes(tiny_model_path, tmp_path):
    records = tmp_path / "records"
    process = subprocess.Popen(
        [sys.executable, "-m", "tvmq", "tune", tiny_model_path, "--records", str(records),
         "--trials", "300"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (records / RECORDS).exists() or not (records / RECORDS).stat().st_size:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = len(measurements(records))
    assert killed >= 1
    load_database(records)
    result = tune(tiny_model_path, records=records, trials=3 * KERNELS, progress=False)
    assert all(k.trials >= k.budget for k in result.kernels)
    assert len(measurements(records)) >= killed


def test_an_incomplete_last_line_is_dropped_with_a_warning(tuned, tiny_model_path, tmp_path):
    records = _copy(tuned[0], tmp_path)
    with open(os.path.join(records, RECORDS), "a") as handle:
        handle.write('[0, [[["GetSBlock", [], ["conv')  # what a kill mid-write leaves
    load_database(records)  # readers skip it, and leave the file to the tuner
    with pytest.warns(UserWarning, match="dropped an incomplete last line from .*"
                      "database_tuning_record.json"):
        result = tune(tiny_model_path, records=records, trials=KERNELS, progress=False)
    assert result.measured_now == 0
    with open(os.path.join(records, RECORDS)) as handle:
        assert handle.read().endswith("\n")


def test_a_records_file_that_is_not_json_is_reported(tuned, tiny_model_path, tmp_path, capsys):
    records = _copy(tuned[0], tmp_path)
    with open(os.path.join(records, RECORDS), "w") as handle:
        handle.write("this is not a tuning record\n")
    message = (
        r"tuning records file '.*database_tuning_record.json' is corrupt at line 1 \(not JSON\)"
    )
    with pytest.raises(TuningError, match=message):
        tvmq.compile(tiny_model_path, target="x86", tuning_records=records)
    with pytest.raises(TuningError, match=message):
        tune(tiny_model_path, records=records, trials=KERNELS, progress=False)
    assert main(["tune", tiny_model_path, "--records", records, "--trials", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvmq: error: tuning records file") and "\n" not in err


def test_a_second_run_on_the_same_directory_is_refused(tiny_model_path, tmp_path):
    records = tmp_path / "records"
    with locked(records), pytest.raises(
        TuningError,
        match=rf"records directory '{records}' is being tuned by another tvmq tune "
        rf"\(pid {os.getpid()}\); wait for it or use another --records",
    ):
        tune(tiny_model_path, records=records, trials=KERNELS, progress=False)


def test_option_errors(tiny_model_path, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--trials 0 must be at least 1"):
        tune(tiny_model_path, records=tmp_path, trials=0)
    with pytest.raises(ConfigError, match="--early-stopping 0 must be at least 1"):
        tune(tiny_model_path, records=tmp_path, trials=1, early_stopping=0)
    with pytest.raises(ConfigError, match=r"--rpc-tracker 'nohost' is not HOST:PORT"):
        RPCTracker.parse("nohost", "key")
    with pytest.raises(ConfigError, match="--rpc-tracker needs --rpc-key"):
        RPCTracker.parse("127.0.0.1:9190", "")
    assert main(["tune", tiny_model_path, "--records", str(tmp_path), "--trials", "1",
                 "--rpc-key", "k"]) == 1
    assert "--rpc-key needs --rpc-tracker" in capsys.readouterr().err
    # tune takes compile's graph options, checked the same way: a bad mode is a usage error.
    with pytest.raises(SystemExit) as usage:
        main(["tune", tiny_model_path, "--records", str(tmp_path), "--trials", "1",
              "--quantize", "int5"])
    assert usage.value.code == 2
    assert "invalid choice: 'int5'" in capsys.readouterr().err


def test_an_unreachable_tracker_is_reported(tiny_model_path, tmp_path):
    port = _free_port()
    with pytest.raises(TuningError, match=rf"cannot reach the RPC tracker at 127.0.0.1:{port} "
                       r"\(.*\); start it with 'python -m tvm.exec.rpc_tracker"):
        tune(tiny_model_path, records=tmp_path, trials=KERNELS, progress=False,
             rpc=RPCTracker("127.0.0.1", port, "tvmq-test"))


def test_early_stopping_stops_a_kernel_without_a_new_best():
    kernel = Kernel("k", tvm.IRModule(), "0", 0.0)
    progress = Progress([kernel], [100], "/nonexistent", 3, None)
    assert progress.start(0) == 100
    assert not progress.add([2.0, 1.0, 1.5])
    assert progress.add([1.2, None])  # three since the best (1.0)
    assert progress.start(0) == 0  # a rerun sees the same and skips it


@pytest.fixture
def rpc_farm():
    """A TVM RPC tracker and two servers on 127.0.0.1, as a device farm runs them."""
    key = "tvmq-test"
    port = _free_port()
    processes = [_spawn("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", port,
                        "--port-end", port + 1, "--silent")]
    try:
        for _ in range(2):
            server = _free_port()
            processes.append(_spawn(
                "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", key,
                "--host", "127.0.0.1", "--port", server, "--port-end", server + 1, "--silent",
            ))
        deadline = time.monotonic() + 60
        while _free_servers(port, key) < 2:
            assert time.monotonic() < deadline, "the RPC servers did not register in 60 s"
            time.sleep(0.5)
        yield RPCTracker("127.0.0.1", port, key)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_tune_through_a_local_rpc_tracker(rpc_farm, tiny_model_path, tmp_path):
    result = tune(tiny_model_path, records=tmp_path, trials=KERNELS, rpc=rpc_farm, progress=False)
    assert result.measured_now == KERNELS
    assert all(k.best_ms is not None for k in result.kernels)
    assert all(m.seconds is not None for m in measurements(tmp_path))


def _run(artifact, x: np.ndarray) -> list[np.ndarray]:
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "model.tar")
        artifact.export(path)
        return list(tvmq.runtime.load(path).run(x=x).values())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(module: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _free_servers(port: int, key: str) -> int:
    try:
        summary = tvm.rpc.connect_tracker("127.0.0.1", port).summary()
    except Exception:
        return 0
    return int(summary.get("queue_info", {}).get(key, {}).get("free", 0))


def test_a_build_past_its_time_limit_fails_alone(tiny_model_path, tmp_path):
    """A candidate LLVM cannot finish in time is a failed measurement, not a hung run."""
    from tvmq.schedules.measure import InProcessBuilder

    kernel = _tiny_kernels(tiny_model_path)[0]
    target = tvmq.targets.resolve("x86").tvm_target()
    inputs = [ms.builder.BuilderInput(kernel.workload, target)]
    (slow,) = InProcessBuilder(timeout_s=0.0001).build(inputs)
    assert slow.artifact_path is None and "timed out" in slow.error_msg
    (built,) = InProcessBuilder().build(inputs)
    assert built.error_msg is None and os.path.exists(built.artifact_path)


def _tiny_kernels(path):
    from tvmq.schedules.tune import _fused
    from tvmq.schedules.workloads import kernels

    return kernels(_fused(path, tvmq.targets.resolve("x86"), tvmq.CompileConfig(), None))
