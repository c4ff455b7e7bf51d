"""Time one convolution under each algorithm on this machine, for ChooseConvAlgorithm.

Each candidate is built alone (the convolution and nothing else) through the same pipeline
the model is built with, so it gets the same schedules, and timed with TVM's
``time_evaluator``. Results are cached per target and shape in ``conv_algorithms-v4.json``
under ``$TVMQ_CACHE_DIR`` (default ``~/.cache/tvmq``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Callable

import tvm
from tvm import relax

from .passes._conv import Conv2D, IntDot
from .passes.conv_algorithm import ConvAlgorithm, MeasurementCache, emit, random_conv_input
from .schedules.cpu_common import weight_block


def cache_path() -> str:
    root = os.environ.get("TVMQ_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tvmq"
    )
    # v2: "direct" became the blocked-weight kernel; v3: Winograd's two-pass input
    # transform and bands; v4: k x k GEMM on the pointwise kernel. Older timings are of
    # other kernels.
    return os.path.join(root, "conv_algorithms-v4.json")


def measurer(preset, passes: Callable[[], list], int_dot: IntDot = IntDot.WIDE
             ) -> Callable[[Conv2D, ConvAlgorithm], float]:
    """``measure(conv, algorithm) -> ms`` for ``preset``; ``passes()`` gives the pipeline
    a lone candidate is built with (the model's, without the algorithm choice); integer
    layers take ``int_dot``'s operand form, as in the model."""
    cache = MeasurementCache(cache_path())
    target_key = json.dumps(preset.target, sort_keys=True)

    def measure(conv: Conv2D, algorithm: ConvAlgorithm) -> float:
        key = MeasurementCache.key(target_key, conv, algorithm)
        cached = cache.get(key)
        if cached is not None:
            return cached
        builder = relax.BlockBuilder()
        data = relax.Var("data", relax.TensorType(conv.data_shape, conv.data.ty.dtype))
        lone = dataclasses.replace(conv, data=data)
        with builder.function("main", [data]):
            with builder.dataflow():
                value = emit(builder, lone, algorithm, weight_block(preset.tvm_target()),
                             int_dot)
                if value is None:
                    value = relax.op.nn.conv2d(
                        data, relax.const(conv.weight), conv.strides, conv.padding,
                        conv.dilation, conv.groups, out_dtype=conv.out_dtype,
                    )
                output = builder.emit_output(value)
            builder.emit_func_output(output)
        target = preset.tvm_target()
        with target, tvm.transform.PassContext(opt_level=3):
            mod = tvm.transform.Sequential(passes())(builder.get())
            executable = tvm.compile(mod, target=target, relax_pipeline=None)
        device = tvm.cpu()
        vm = relax.VirtualMachine(executable, device)
        vm.set_input("main", tvm.runtime.tensor(random_conv_input(lone), device))
        timer = vm.time_evaluator("invoke_stateful", device, number=3, repeat=5, min_repeat_ms=20)
        ms = statistics.median(timer("main").results) * 1e3
        cache.put(key, ms)
        return ms

    return measure
