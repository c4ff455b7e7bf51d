"""Kernel checks: default schedules compute what the unscheduled kernels compute."""

from __future__ import annotations

import importlib.resources

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm.s_tir import Schedule
from tvmq.schedules import default_schedule_passes
from tvmq.schedules.verify import check_kernel, random_buffers, runs_here

import tvmq
from tvmq.pipeline import pass_name

TARGET = tvmq.targets.resolve("x86")


def _model(op: str, x_shape, inits: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", *inits], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


def _w(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.3, shape).astype(np.float32)


SHAPES = {
    "conv3x3": _model("Conv", [1, 8, 14, 14], {"w": _w(16, 8, 3, 3), "b": _w(16)}, pads=[1] * 4),
    "conv_stride2": _model("Conv", [1, 3, 17, 17], {"w": _w(8, 3, 3, 3)}, strides=[2, 2]),
    "conv1x1": _model("Conv", [1, 16, 7, 7], {"w": _w(32, 16, 1, 1)}),
    "depthwise": _model("Conv", [1, 8, 9, 9], {"w": _w(8, 1, 3, 3)}, group=8, pads=[1] * 4),
    "matmul": _model("MatMul", [5, 37], {"w": _w(37, 19)}),
    "batch_matmul": _model("MatMul", [2, 6, 33], {"w": _w(33, 12)}),
    "gemm": _model("Gemm", [3, 24], {"w": _w(10, 24), "b": _w(10)}, transB=1),
    "maxpool": _model("MaxPool", [1, 4, 11, 11], {}, kernel_shape=[3, 3], strides=[2, 2]),
    "avgpool": _model("AveragePool", [1, 4, 8, 8], {}, kernel_shape=[2, 2], strides=[2, 2]),
    "global_pool": _model("GlobalAveragePool", [1, 6, 5, 5], {}),
}


def _digits() -> str:
    return str(importlib.resources.files("tvmq") / "examples" / "digits.onnx")


def _default_scheduled(mod: tvm.IRModule) -> tuple[dict, tvm.IRModule]:
    """The kernels right after FuseTIR, and the module after the default schedules."""
    passes = tvmq.pipeline(TARGET)
    names = [pass_name(p) for p in passes]
    fused_at = len(names) - 1 - names[::-1].index("FuseTIR")
    target = TARGET.tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(passes[: fused_at + 1])(mod)
        # Taken before scheduling: ApplyDefaultSchedule updates the module it is given.
        kernels = {
            gv: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
        }
        scheduled = tvm.transform.Sequential(default_schedule_passes(target))(fused)
    return kernels, scheduled


@pytest.mark.parametrize("name", [*SHAPES, "digits"])
def test_default_schedules_compute_what_the_kernels_compute(name, tmp_path):
    if name == "digits":
        path = _digits()
    else:
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(SHAPES[name], path)
    kernels, scheduled = _default_scheduled(tvmq.load(path))
    checked = 0
    for gv, func in kernels.items():
        assert not tvm_ffi.structural_equal(func, scheduled[gv]), f"{gv.name_hint} unscheduled"
        check = check_kernel(func, scheduled[gv], target=TARGET.tvm_target(), name=gv.name_hint)
        assert check.ok, f"{name}: default schedule of {check.name} is wrong: {check.detail}"
        checked += 1
    assert checked >= 1


def _conv_kernel() -> tvm.tirx.PrimFunc:
    kernels, _ = _default_scheduled(_load("conv3x3"))
    return next(f for gv, f in kernels.items() if "conv2d" in gv.name_hint)


def _load(name: str) -> tvm.IRModule:
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        path = f"{work}/{name}.onnx"
        onnx.save(SHAPES[name], path)
        return tvmq.load(path)


def test_a_schedule_that_changes_the_result_is_caught():
    kernel = _conv_kernel()
    schedule = Schedule(tvm.IRModule({"main": kernel}))
    assert check_kernel(kernel, schedule.mod["main"], target=TARGET.tvm_target()).ok
    # Storing the accumulator as float16 is a real loss of precision, not a reordering.
    block = schedule.get_sblock("conv2d_blocked")
    schedule.unsafe_set_dtype(block, 0, "float16")
    check = check_kernel(kernel, schedule.mod["main"], target=TARGET.tvm_target(), name="conv")
    assert not check.ok
    assert check.name == "conv" and check.max_error > 1e-4
    assert check.detail.startswith("buffer ")


def test_random_buffers_cover_every_parameter_with_its_dtype():
    kernel = _conv_kernel()
    arrays = random_buffers(kernel)
    assert len(arrays) == len(kernel.params)
    assert all(a.dtype == np.float32 for a in arrays)
    assert np.abs(arrays[0]).max() <= 1.0


def test_targets_this_machine_cannot_run_are_known():
    assert runs_here(TARGET.tvm_target())
    assert not runs_here(tvmq.targets.resolve("aarch64").tvm_target())
