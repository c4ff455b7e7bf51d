"""BlockMatmulWeights (passes/matmul_blocked.py) and its schedule (schedules/cpu_matmul.py):
structure, no-op cases, and numbers against numpy for float32 and int8 x int8 -> int32."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmq.passes.matmul_blocked import (
    KERNEL_NAME,
    BlockMatmulWeights,
    blocked_weight,
    matmul_blocked,
)

import tvmq

RNG = np.random.default_rng(11)


def _module(x_shape, weight, x_dtype="float32", out_dtype=None, weight_expr=None):
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    params = [x]
    if weight_expr == "param":
        w = relax.Var("w", relax.TensorType(weight.shape, str(weight.dtype)))
        params.append(w)
    else:
        w = relax.const(weight)
    with builder.function("main", params):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, w, out_dtype=out_dtype or "void"))
            out = builder.emit_output(relax.op.add(y, y))
        builder.emit_func_output(out)
    return builder.get()


def test_blocked_weight_layout():
    w = RNG.normal(size=(5, 32)).astype(np.float32)
    blocked = blocked_weight(w, 16)
    assert blocked.shape == (2, 5, 16)
    assert blocked[1, 3, 7] == w[3, 16 + 7]


def test_structure():
    w = RNG.normal(size=(8, 32)).astype(np.float32)
    after = BlockMatmulWeights(16)(_module((4, 8), w))
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(builder.call_te(
                matmul_blocked, x, relax.const(blocked_weight(w, 16)), "float32",
                primfunc_name_hint=KERNEL_NAME))
            out = builder.emit_output(relax.op.add(y, y))
        builder.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, builder.get())


@pytest.mark.parametrize("case", ["weight is a parameter", "columns do not block", "no block"])
def test_no_match_leaves_module_unchanged(case):
    w = RNG.normal(size=(8, 12 if case == "columns do not block" else 32)).astype(np.float32)
    before = _module((4, 8), w, weight_expr="param" if case == "weight is a parameter" else None)
    after = BlockMatmulWeights(None if case == "no block" else 16)(before)
    tvm.ir.assert_structural_equal(after, before)


def test_idempotent():
    once = BlockMatmulWeights(16)(_module((4, 8), RNG.normal(size=(8, 32)).astype(np.float32)))
    tvm.ir.assert_structural_equal(BlockMatmulWeights(16)(once), once)


def _run(mod, x, target="x86"):
    preset = tvmq.targets.resolve(target)
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset))(mod)
    kernels = [gv.name_hint for gv, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(KERNEL_NAME in name for name in kernels)
    vm = relax.VirtualMachine(tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None),
                              tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("x_shape, columns", [
    ((1, 64), 1000 - 1000 % 16),  # a classifier row, block 16 (AVX2) or 16 (AVX-512)
    ((2, 7, 48), 96),             # batched rows that no tile divides evenly
    ((128, 96), 48),
    ((197, 64), 32),              # no small divisor: a predicated 4-row tile
])
def test_float_matches_numpy(x_shape, columns):
    w = RNG.normal(0, 0.2, (x_shape[-1], columns)).astype(np.float32)
    x = RNG.normal(size=x_shape).astype(np.float32)
    got = _run(_module(x_shape, w), x)
    np.testing.assert_allclose(got, 2 * (x.astype(np.float64) @ w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_int8_is_exact(x_dtype):
    w = RNG.integers(-128, 128, (40, 32)).astype(np.int8)
    info = np.iinfo(x_dtype)
    x = RNG.integers(info.min, info.max + 1, (6, 40)).astype(x_dtype)
    got = _run(_module((6, 40), w, x_dtype, "int32"), x)
    assert np.array_equal(got, 2 * (x.astype(np.int64) @ w.astype(np.int64)))


def _assembly(mod, target):
    preset = tvmq.targets.resolve(target)
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset))(mod)
    executable = tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None)
    return "".join(m.inspect_source("asm") for m in executable.mod.imports)


def test_int8_matmul_uses_vpmaddwd_on_avx2():
    w = RNG.integers(-128, 128, (64, 32)).astype(np.int8)
    asm = _assembly(_module((16, 64), w, "int8", "int32"), "x86-avx2")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm


def test_uint8_matmul_uses_vpdpbusd_with_vnni():
    w = RNG.integers(-128, 128, (64, 64)).astype(np.int8)
    assert "vpdpbusd" in _assembly(_module((16, 64), w, "uint8", "int32"), "x86-vnni")
    # A depth that does not split into quads takes pairs.
    w = RNG.integers(-128, 128, (42, 64)).astype(np.int8)
    asm = _assembly(_module((16, 42), w, "uint8", "int32"), "x86-vnni")
    # (LLVM fuses vpmaddwd and its add into VNNI's vpdpwssd.)
    assert ("vpmaddwd" in asm or "vpdpwssd" in asm) and "vpdpbusd" not in asm


@pytest.mark.skipif(not tvmq.targets.resolve("x86-vnni").runs_here(),
                    reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("x_shape, columns", [((6, 40), 32), ((197, 64), 64), ((2, 9, 44), 48)])
def test_uint8_vnni_is_exact(x_shape, columns):
    w = RNG.integers(-128, 128, (x_shape[-1], columns)).astype(np.int8)
    x = RNG.integers(0, 256, x_shape).astype(np.uint8)
    got = _run(_module(x_shape, w, "uint8", "int32"), x, "x86-vnni")
    assert np.array_equal(got, 2 * (x.astype(np.int64) @ w.astype(np.int64)))
