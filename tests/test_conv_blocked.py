"""The blocked direct convolution (passes/conv_blocked.py) and its schedule
(schedules/cpu_conv.py): weight layout, tile choice, and numbers against numpy for float32
and the int8 x int8 -> int32 convolutions of quantized layers."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmq.passes.conv_algorithm import ConvPolicy
from tvmq.passes.conv_blocked import DEPTHWISE_NAME, KERNEL_NAME, blocked_weight
from tvmq.schedules.cpu_conv import choose_tile

import tvmq

RNG = np.random.default_rng(7)


def reference_conv(x, w, strides, padding, dilation, dtype):
    """Plain numpy NCHW / OIHW convolution, accumulated in ``dtype``."""
    top, left, bottom, right = padding
    x = np.pad(x.astype(dtype), ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, h, width = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow), dtype)
    for ry in range(kh):
        for rx in range(kw):
            window = x[:, :, ry * dh : ry * dh + sh * oh : sh, rx * dw : rx * dw + sw * ow : sw]
            out += np.einsum("nchw,oc->nohw", window, w[:, :, ry, rx].astype(dtype))
    return out


def _conv_module(shape, weight, strides, padding, dilation, out_dtype, groups=1):
    """x -> conv(x) + conv(x): the add is an epilogue the kernel must fuse."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "int8" if out_dtype == "int32" else "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(weight), strides, padding, dilation, groups=groups,
                out_dtype=out_dtype))
            out = builder.emit_output(relax.op.add(conv, conv))
        builder.emit_func_output(out)
    return builder.get()


def _build(mod, policy=ConvPolicy.DIRECT):
    """(executable, kernel names) of ``mod`` through tvmq's x86 pipeline."""
    preset = tvmq.targets.resolve("x86")
    config = tvmq.CompileConfig(conv_algorithm=policy)
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset, config))(mod)
    kernels = [gv.name_hint for gv, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    return tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None), kernels


def _compiled_conv(shape, weight, strides, padding, dilation, out_dtype, groups=1,
                   policy=ConvPolicy.DIRECT):
    executable, kernels = _build(
        _conv_module(shape, weight, strides, padding, dilation, out_dtype, groups), policy)
    return relax.VirtualMachine(executable, tvm.cpu()), kernels


def test_blocked_weight_layout():
    w = RNG.normal(size=(32, 3, 2, 5)).astype(np.float32)
    blocked = blocked_weight(w, 16)
    assert blocked.shape == (2, 3, 2, 5, 16)
    assert blocked[1, 2, 1, 4, 3] == w[16 + 3, 2, 1, 4]


@pytest.mark.parametrize("oh, ow, vectors, registers, expected", [
    (56, 56, 2, 16, (2, 2, 2)),   # AVX2: 8 accumulators, square tile
    (14, 14, 2, 16, (2, 2, 2)),
    (7, 7, 2, 16, (1, 7, 1)),     # 7 wide: one vector x 7 pixels beats 2 x 1
    (56, 56, 2, 32, (2, 7, 2)),   # AVX-512: 28 accumulators
    (13, 13, 2, 16, (1, 1, 2)),   # prime size: no pixel tile fits; still correct
])
def test_choose_tile(oh, ow, vectors, registers, expected):
    assert choose_tile(oh, ow, vectors, registers) == expected


CASES = [
    # shape, out channels, kernel, strides, padding, dilation
    ((1, 8, 14, 14), 32, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 5, 11, 9), 24, 3, (2, 2), (0, 1, 2, 1), (1, 1)),     # block 8: 24 = 3 x 8
    ((2, 16, 12, 12), 16, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 4, 17, 17), 32, 3, (1, 2), (2, 2, 2, 2), (2, 2)),
    ((1, 3, 23, 23), 16, 7, (2, 2), (3, 3, 3, 3), (1, 1)),
    ((1, 8, 13, 13), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1)),    # odd: computed 14x14, cropped
]


@pytest.mark.parametrize("shape, out_channels, k, strides, padding, dilation", CASES)
def test_float_matches_numpy(shape, out_channels, k, strides, padding, dilation):
    w = RNG.normal(0, 0.3, (out_channels, shape[1], k, k)).astype(np.float32)
    x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, strides, padding, dilation, "float32")
    assert any(KERNEL_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, strides, padding, dilation, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, out_channels, k, strides, padding, dilation", CASES[:3])
def test_int8_is_exact(shape, out_channels, k, strides, padding, dilation):
    w = RNG.integers(-128, 128, (out_channels, shape[1], k, k)).astype(np.int8)
    x = RNG.integers(-128, 128, shape).astype(np.int8)
    vm, kernels = _compiled_conv(shape, w, strides, padding, dilation, "int32")
    assert any(KERNEL_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, strides, padding, dilation, np.int64)
    assert np.array_equal(got, want)


def test_channels_that_do_not_block_keep_tvm_conv():
    w = RNG.normal(size=(3, 4, 3, 3)).astype(np.float32)
    x = RNG.normal(size=(1, 4, 8, 8)).astype(np.float32)
    vm, kernels = _compiled_conv((1, 4, 8, 8), w, (1, 1), (1, 1, 1, 1), (1, 1), "float32")
    assert not any(KERNEL_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(
        got, 2 * reference_conv(x, w, (1, 1), (1, 1, 1, 1), (1, 1), np.float64),
        rtol=1e-4, atol=1e-4)


def reference_depthwise(x, w, strides, padding, dtype):
    return np.concatenate([
        reference_conv(x[:, c : c + 1], w[c : c + 1], strides, padding, (1, 1), dtype)
        for c in range(x.shape[1])
    ], axis=1)


@pytest.mark.parametrize("shape, strides, dtype, kernel", [
    ((1, 6, 40, 40), (1, 1), "float32", DEPTHWISE_NAME),
    ((1, 5, 75, 66), (2, 2), "float32", DEPTHWISE_NAME),   # 38 x 33 output, odd width
    ((1, 4, 36, 36), (1, 1), "int32", DEPTHWISE_NAME),
    ((1, 8, 14, 14), (1, 1), "float32", None),             # rows too narrow: TVM's kernel
])
def test_depthwise_matches_numpy(shape, strides, dtype, kernel):
    channels = shape[1]
    if dtype == "int32":
        w = RNG.integers(-128, 128, (channels, 1, 3, 3)).astype(np.int8)
        x = RNG.integers(-128, 128, shape).astype(np.int8)
    else:
        w = RNG.normal(0, 0.3, (channels, 1, 3, 3)).astype(np.float32)
        x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, strides, (1, 1, 1, 1), (1, 1), dtype, groups=channels)
    assert any(DEPTHWISE_NAME in name for name in kernels) == (kernel is not None)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_depthwise(x, w, strides, (1, 1, 1, 1),
                                   np.int64 if dtype == "int32" else np.float64)
    if dtype == "int32":
        assert np.array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _assembly(shape, weight, out_dtype):
    executable, _ = _build(
        _conv_module(shape, weight, (1, 1), (1, 1, 1, 1), (1, 1), out_dtype))
    return "".join(m.inspect_source("asm") for m in executable.mod.imports)


def test_int8_conv_uses_vpmaddwd_on_avx2():
    # Even input channels: the int16 pair form, tensorized with vpmaddwd.
    w = RNG.integers(-128, 128, (16, 16, 3, 3)).astype(np.int8)
    assert "vpmaddwd" in _assembly((1, 16, 8, 8), w, "int32")


@pytest.mark.parametrize("shape, out_channels", [
    ((1, 16, 8, 32), 12),    # two pixel vectors per row, 6 channels per tile
    ((1, 8, 4, 24), 10),     # one vector per row, 10 channels per tile
])
def test_pointwise_gemm_matches_numpy(shape, out_channels):
    from tvmq.passes.conv_to_gemm import POINTWISE_NAME

    w = RNG.normal(0, 0.3, (out_channels, shape[1], 1, 1)).astype(np.float32)
    x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, (1, 1), (0, 0, 0, 0), (1, 1), "float32",
                                 policy=ConvPolicy.GEMM)
    assert any(POINTWISE_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, (1, 1), (0, 0, 0, 0), (1, 1), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
