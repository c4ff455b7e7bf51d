"""How candidates are built and measured: in this process, then locally or over RPC.

The runners are meta_schedule's own (``LocalRunner``, or ``RPCRunner`` through a TVM tracker
and its servers, the device-farm pattern); the builder and the XGBoost cost model are
meta_schedule's with the overheads that dominate small tuning runs removed.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from tvmq.errors import ConfigError, TuningError

EVALUATOR = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100)


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


def make_runner(rpc: RPCTracker | None) -> ms.runner.Runner:
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=EVALUATOR)
    servers = _free_servers(rpc)
    config = ms.runner.RPCConfig(
        tracker_host=rpc.host,
        tracker_port=rpc.port,
        tracker_key=rpc.key,
        session_timeout_sec=rpc.session_timeout_s,
    )
    return ms.runner.RPCRunner(config, EVALUATOR, max_workers=servers)


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


# A candidate whose build takes longer than this is dropped as failed: LLVM spent over 12
# minutes on one candidate of a ResNet-50 INT8 kernel (a fully unrolled epilogue, likely)
# and would have held the whole tuning run.
BUILD_TIMEOUT_S = 60


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds each candidate in a child forked from this process, with a time limit.

    LocalBuilder starts a fresh process pool for every round, and each worker imports TVM
    and every tensor intrinsic (seconds to minutes on a busy 2-core machine) to compile
    kernels that take milliseconds; a fork inherits them. A candidate whose build crashes
    the compiler or runs past ``timeout_s`` fails alone; the run goes on.
    """

    def __init__(self, timeout_s: float = BUILD_TIMEOUT_S) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def build(self, build_inputs):
        return [self._build(build_input) for build_input in build_inputs]

    def _build(self, build_input) -> ms.builder.BuilderResult:
        import signal
        import time

        directory = tempfile.mkdtemp(prefix="tvmq-tune-")
        path = os.path.join(directory, "kernel.tar")
        error_path = os.path.join(directory, "error.txt")
        pid = os.fork()
        if pid == 0:  # the child: build, write the library or the error, exit at once
            code = 0
            try:
                from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
                from tvm.support.tar import tar

                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(build_input.mod)
                library = tvm.tirx.build(mod, target=build_input.target)
                library.export_library(path, fcompile=tar)
            except BaseException as err:
                with open(error_path, "w") as handle:
                    handle.write(f"build failed: {err}")
                code = 1
            os._exit(code)
        deadline = time.monotonic() + self.timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ms.builder.BuilderResult(
                    None, f"build timed out after {self.timeout_s:g} s")
            time.sleep(0.002)
        if status == 0 and os.path.exists(path):
            return ms.builder.BuilderResult(path, None)
        if os.path.exists(error_path):
            with open(error_path) as handle:
                return ms.builder.BuilderResult(None, handle.read())
        return ms.builder.BuilderResult(None, f"build crashed (wait status {status})")


@derived_object
class XGBModel(ms.cost_model.XGBModel._cls):
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
