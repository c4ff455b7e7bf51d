"""Check a scheduled kernel against its unscheduled self on random inputs.

A schedule may only reorder, tile, vectorize or tensorize a kernel; it must not change what
it computes. That is exactly what a wrong tensorization or a bad tuning record breaks (an
int8 dense tensorized on plain [N, K] weights ran 6.5x faster and gave wrong numbers), and
meta_schedule never checks it. The reference is the same kernel as LegalizeOps and FuseTIR
produced it, built without a schedule for the host CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

# Largest error allowed, relative to the largest reference value: float sums reassociated
# by tiling differ by a few ulps per term; a wrong kernel is off by the values themselves.
FLOAT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class KernelCheck:
    """The outcome of running a scheduled kernel and its reference on the same inputs."""

    name: str
    ok: bool
    max_error: float
    detail: str = ""


def runs_here(target: tvm.target.Target) -> bool:
    """Whether kernels built for ``target`` can run on this machine."""
    from tvmq.targets.preset import TargetPreset

    from tvmq.errors import ArtifactError
    from tvmq.runtime import check_host

    preset = TargetPreset.of(target)
    needs = {
        "target": {"preset": str(target)},
        "arch": preset.arch,
        "cpu_features": preset.required_cpu_features(),
        "device": preset.device,
    }
    try:
        check_host(needs, "kernel")
    except ArtifactError:
        return False
    return True


def check_kernel(
    reference: tvm.tirx.PrimFunc,
    candidate: tvm.tirx.PrimFunc,
    *,
    target: tvm.target.Target,
    name: str = "main",
    seed: int = 0,
) -> KernelCheck:
    """Run ``candidate`` (built for ``target``) and ``reference`` (built unscheduled for the
    host) on the same random buffers and compare every buffer afterwards."""
    device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    buffers = random_buffers(reference, seed=seed)
    try:
        expected = _run(reference, tvm.target.Target({"kind": "llvm"}), tvm.cpu(0), buffers)
    except Exception as err:
        return KernelCheck(name, False, float("inf"), f"reference failed: {_first_line(err)}")
    try:
        actual = _run(candidate, target, device, buffers)
    except Exception as err:
        return KernelCheck(name, False, float("inf"), f"failed to build or run: {_first_line(err)}")
    worst = 0.0
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        error = _error(want, got)
        worst = max(worst, error)
        limit = FLOAT_TOLERANCE if want.dtype.kind in "fc" else 0.0
        if not error <= limit:
            return KernelCheck(name, False, error, f"buffer {index} differs by {error:.3g}")
    return KernelCheck(name, True, worst)


def random_buffers(func: tvm.tirx.PrimFunc, *, seed: int = 0) -> list[np.ndarray]:
    """One random array per buffer parameter of ``func``, outputs included."""
    from tvm.s_tir.meta_schedule.arg_info import TensorInfo

    rng = np.random.default_rng(seed)
    arrays = []
    for info in TensorInfo.from_prim_func(func):
        shape = tuple(int(d) for d in info.shape)
        dtype = np.dtype(str(info.dtype))
        if dtype.kind == "f":
            array = rng.uniform(-1.0, 1.0, shape)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape)
        elif dtype.itemsize == 1:
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max + 1, shape)
        else:
            # Wider integers may be indices (take, gather): keep them in every dimension.
            array = rng.integers(0, 2, shape)
        arrays.append(array.astype(dtype))
    return arrays


def build_kernel(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.runtime.Module:
    """``func`` alone, compiled for ``target`` as a runnable module with entry ``main``."""
    func = func.with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target).jit()


def _run(func, target, device, buffers: list[np.ndarray]) -> list[np.ndarray]:
    library = build_kernel(func, target)
    tensors = [tvm.runtime.tensor(array, device) for array in buffers]
    library["main"](*tensors)
    return [tensor.numpy() for tensor in tensors]


def _error(want: np.ndarray, got: np.ndarray) -> float:
    if want.dtype.kind not in "fc":
        return float(np.abs(want.astype(np.float64) - got.astype(np.float64)).max(initial=0))
    if not np.array_equal(np.isnan(want), np.isnan(got)):
        return float("inf")
    finite = ~np.isnan(want)
    scale = max(float(np.abs(want[finite]).max(initial=0)), 1e-6)
    return float(np.abs(want[finite] - got[finite]).max(initial=0)) / scale


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:200] if text else type(err).__name__
