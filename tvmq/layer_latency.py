"""Time one quantized layer alone on this machine, for SelectBits' latency costs.

The layer (its input quantize, the integer conv / matmul with INT4 or INT8 weights, its
requantize) is built alone through the same pipeline the model is built with, so it gets
the same kernels and schedules, and timed with TVM's ``time_evaluator``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax


def layer_timer(preset, passes: Callable[[], list]) -> Callable[[tvm.IRModule, list], float]:
    """``measure(mod, inputs) -> seconds``: median run time of ``mod`` built for ``preset``
    with ``passes()`` (the model's pipeline, without quantization)."""

    def measure(mod: tvm.IRModule, inputs: list[np.ndarray]) -> float:
        target = preset.tvm_target()
        with target, tvm.transform.PassContext(opt_level=3):
            built = tvm.transform.Sequential(passes())(mod)
            executable = tvm.compile(built, target=target, relax_pipeline=None)
        device = tvm.cpu()
        vm = relax.VirtualMachine(executable, device)
        vm.set_input("main", *(tvm.runtime.tensor(x, device) for x in inputs))
        timer = vm.time_evaluator("invoke_stateful", device, number=3, repeat=5, min_repeat_ms=10)
        return float(statistics.median(timer("main").results))

    return measure
