"""The blocked direct convolution (passes/conv_blocked.py) and its schedule
(schedules/cpu_conv.py): weight layout, tile choice, and numbers against numpy for float32
and the int8 x int8 -> int32 convolutions of quantized layers."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmq.passes.conv_algorithm import ConvPolicy
from tvmq.passes.conv_blocked import (
    DEPTHWISE_NAME,
    KERNEL_NAME,
    _flat_extent,
    blocked_weight,
    grouped_weight,
)
from tvmq.schedules.cpu_common import weight_block
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


def _conv_module(shape, weight, strides, padding, dilation, out_dtype, groups=1,
                 data_dtype=None):
    """x -> conv(x) + conv(x): the add is an epilogue the kernel must fuse."""
    builder = relax.BlockBuilder()
    data_dtype = data_dtype or ("int8" if out_dtype == "int32" else "float32")
    x = relax.Var("x", relax.TensorType(shape, data_dtype))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(weight), strides, padding, dilation, groups=groups,
                out_dtype=out_dtype))
            out = builder.emit_output(relax.op.add(conv, conv))
        builder.emit_func_output(out)
    return builder.get()


def _build(mod, policy=ConvPolicy.DIRECT, target="x86"):
    """(executable, kernel names) of ``mod`` through tvmq's pipeline for ``target``."""
    preset = tvmq.targets.resolve(target)
    config = tvmq.CompileConfig(conv_algorithm=policy)
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset, config))(mod)
    kernels = [gv.name_hint for gv, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    return tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None), kernels


def _compiled_conv(shape, weight, strides, padding, dilation, out_dtype, groups=1,
                   policy=ConvPolicy.DIRECT, target="x86"):
    executable, kernels = _build(
        _conv_module(shape, weight, strides, padding, dilation, out_dtype, groups), policy,
        target)
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
    (56, 56, 2, 32, (2, 4, 2)),   # AVX-512: at most 16 accumulators
    (14, 14, 2, 32, (1, 7, 2)),
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


# The vector widths the kernels are built for, where this CPU runs them.
TARGETS = [
    pytest.param(name, marks=pytest.mark.skipif(
        not tvmq.targets.resolve(name).runs_here(), reason=f"this CPU cannot run {name}"))
    for name in ("x86-avx2", "x86-avx512")
]


def _blocks(target: str, out_channels: int) -> bool:
    """Whether the blocked kernel takes ``out_channels`` on ``target`` (its weight block or
    half of it divides them: 16 or 8 on AVX2, 32 or 16 on AVX-512)."""
    block = weight_block(tvmq.targets.resolve(target).tvm_target())
    return out_channels % block == 0 or out_channels % (block // 2) == 0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape, out_channels, k, strides, padding, dilation", CASES)
def test_float_matches_numpy(shape, out_channels, k, strides, padding, dilation, target):
    w = RNG.normal(0, 0.3, (out_channels, shape[1], k, k)).astype(np.float32)
    x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, strides, padding, dilation, "float32",
                                 target=target)
    assert any(KERNEL_NAME in name for name in kernels) == _blocks(target, out_channels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, strides, padding, dilation, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape, out_channels, k, strides, padding, dilation", CASES[:3])
def test_int8_is_exact(shape, out_channels, k, strides, padding, dilation, target):
    w = RNG.integers(-128, 128, (out_channels, shape[1], k, k)).astype(np.int8)
    x = RNG.integers(-128, 128, shape).astype(np.int8)
    vm, kernels = _compiled_conv(shape, w, strides, padding, dilation, "int32", target=target)
    assert any(KERNEL_NAME in name for name in kernels) == _blocks(target, out_channels)
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


def reference_depthwise(x, w, strides, padding, dilation, dtype):
    return np.concatenate([
        reference_conv(x[:, c : c + 1], w[c : c + 1], strides, padding, dilation, dtype)
        for c in range(x.shape[1])
    ], axis=1)


@pytest.mark.parametrize("shape, kernel, strides, padding, dilation, dtype", [
    ((1, 6, 40, 40), 3, (1, 1), (1, 1, 1, 1), (1, 1), "float32"),
    ((1, 5, 75, 66), 3, (2, 2), (1, 1, 1, 1), (1, 1), "float32"),  # 38 x 33 output, odd width
    ((1, 4, 36, 36), 3, (1, 1), (1, 1, 1, 1), (1, 1), "int32"),
    ((1, 3, 29, 31), 3, (2, 2), (1, 1, 1, 1), (1, 1), "int32"),
    ((1, 8, 14, 14), 3, (1, 1), (1, 1, 1, 1), (1, 1), "float32"),
    ((1, 8, 7, 7), 3, (1, 1), (1, 1, 1, 1), (1, 1), "float32"),   # rows narrower than a vector
    ((1, 4, 19, 23), 5, (2, 1), (2, 1, 2, 3), (1, 1), "float32"),  # 5x5, mixed stride, padding
    ((1, 4, 20, 20), 3, (1, 1), (2, 2, 2, 2), (2, 2), "float32"),  # dilated
    ((1, 4, 21, 21), 3, (3, 3), (0, 0, 0, 0), (1, 1), "float32"),  # stride 3, unpadded
])
def test_depthwise_matches_numpy(shape, kernel, strides, padding, dilation, dtype):
    channels = shape[1]
    if dtype == "int32":
        w = RNG.integers(-128, 128, (channels, 1, kernel, kernel)).astype(np.int8)
        x = RNG.integers(-128, 128, shape).astype(np.int8)
    else:
        w = RNG.normal(0, 0.3, (channels, 1, kernel, kernel)).astype(np.float32)
        x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, strides, padding, dilation, dtype, groups=channels)
    assert any(DEPTHWISE_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_depthwise(x, w, strides, padding, dilation,
                                   np.int64 if dtype == "int32" else np.float64)
    if dtype == "int32":
        assert np.array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_with_avx2_vectors():
    w = RNG.normal(0, 0.3, (6, 1, 3, 3)).astype(np.float32)
    x = RNG.normal(size=(1, 6, 15, 15)).astype(np.float32)
    vm, kernels = _compiled_conv(x.shape, w, (2, 2), (1, 1, 1, 1), (1, 1), "float32",
                                 groups=6, target="x86-avx2")
    assert any(DEPTHWISE_NAME in name for name in kernels)
    np.testing.assert_allclose(
        vm["main"](tvm.runtime.tensor(x)).numpy(),
        2 * reference_depthwise(x, w, (2, 2), (1, 1, 1, 1), (1, 1), np.float64),
        rtol=1e-4, atol=1e-4)


def test_depthwise_flat_extent_is_whole_vectors():
    assert _flat_extent(7, 9, 16) == (8, 10)     # 80 pixels, 5 vectors
    assert _flat_extent(14, 16, 16) == (14, 16)
    assert _flat_extent(56, 57, 16) == (56, 58)
    for rows, columns in ((3, 5), (28, 30), (38, 34)):
        tall, wide = _flat_extent(rows, columns, 16)
        assert tall >= rows and wide >= columns and tall * wide % 16 == 0


def _assembly(shape, weight, out_dtype, target="x86", data_dtype=None):
    executable, _ = _build(
        _conv_module(shape, weight, (1, 1), (1, 1, 1, 1), (1, 1), out_dtype,
                     data_dtype=data_dtype), target=target)
    return "".join(m.inspect_source("asm") for m in executable.mod.imports)


def test_int8_conv_uses_vpmaddwd_on_avx2():
    # The int16 pair form, tensorized with vpmaddwd (compiled for AVX2 on any x86 host).
    w = RNG.integers(-128, 128, (16, 16, 3, 3)).astype(np.int8)
    asm = _assembly((1, 16, 8, 8), w, "int32", target="x86-avx2")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm


def test_uint8_conv_uses_vpdpbusd_with_vnni():
    # uint8 activations (RealizeQuantization's form for VNNI targets): the quad form,
    # tensorized with vpdpbusd on zmm registers; int8 activations keep vpmaddwd.
    w = RNG.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8)
    asm = _assembly((1, 16, 8, 8), w, "int32", target="x86-vnni", data_dtype="uint8")
    assert "vpdpbusd %zmm" in asm.replace("\t", " ")
    asm = _assembly((1, 16, 8, 8), w, "int32", target="x86-vnni", data_dtype="int8")
    # (LLVM fuses vpmaddwd and its add into VNNI's vpdpwssd where it can.)
    assert ("vpmaddwd" in asm or "vpdpwssd" in asm) and "vpdpbusd" not in asm


def test_grouped_weight_layout():
    w = RNG.integers(-128, 128, (32, 6, 3, 3)).astype(np.int8)
    quads = grouped_weight(blocked_weight(w, 16), 4)
    assert quads.shape == (2, 2, 3, 3, 16, 4)      # 6 channels padded to 8
    assert quads[1, 1, 2, 0, 5, 1] == w[16 + 5, 4 + 1, 2, 0]
    assert not quads[:, 1, :, :, :, 2:].any()      # channels 6 and 7 are zero


_VNNI = tvmq.targets.resolve("x86-vnni")


@pytest.mark.skipif(not _VNNI.runs_here(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("shape, out_channels, k, strides, padding, dilation", [
    CASES[0], CASES[2],
    ((1, 3, 23, 23), 32, 7, (2, 2), (3, 3, 3, 3), (1, 1)),   # 3 channels: one padded quad
    ((1, 8, 13, 13), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
])
def test_uint8_vnni_is_exact(shape, out_channels, k, strides, padding, dilation):
    w = RNG.integers(-128, 128, (out_channels, shape[1], k, k)).astype(np.int8)
    x = RNG.integers(0, 256, shape).astype(np.uint8)
    executable, kernels = _build(
        _conv_module(shape, w, strides, padding, dilation, "int32", data_dtype="uint8"),
        target="x86-vnni")
    assert any(KERNEL_NAME in name for name in kernels)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert np.array_equal(got, 2 * reference_conv(x, w, strides, padding, dilation, np.int64))


@pytest.mark.parametrize("shape, out_channels, target", [
    ((1, 16, 8, 32), 12, "x86-avx2"),    # two pixel vectors per row, 6 channels per tile
    ((1, 8, 4, 24), 10, "x86-avx2"),     # one vector per row, 10 channels per tile
    ((1, 16, 8, 32), 12, "x86-avx512"),  # two 16-pixel vectors per row
    ((1, 12, 8, 28), 24, "x86-avx512"),   # 4 rows of 28 = 7 vectors per tile, 24 channels
    ((1, 8, 6, 12), 4, "x86-avx2"),      # 2 rows of 12 = 3 vectors per tile
])
def test_pointwise_gemm_matches_numpy(shape, out_channels, target):
    from tvmq.passes.conv_to_gemm import POINTWISE_NAME

    if not tvmq.targets.resolve(target).runs_here():
        pytest.skip(f"this CPU cannot run {target}")
    w = RNG.normal(0, 0.3, (out_channels, shape[1], 1, 1)).astype(np.float32)
    x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, (1, 1), (0, 0, 0, 0), (1, 1), "float32",
                                 policy=ConvPolicy.GEMM, target=target)
    assert any(POINTWISE_NAME in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, (1, 1), (0, 0, 0, 0), (1, 1), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, out_channels, k, strides, padding", [
    ((1, 3, 64, 64), 16, 7, (2, 2), (3, 3, 3, 3)),   # a stem: 147 patch rows
    ((1, 8, 32, 32), 12, 3, (2, 2), (1, 1, 1, 1)),   # strided 3x3
    ((1, 4, 34, 34), 6, 3, (1, 1), (0, 0, 0, 0)),    # unpadded: 32 wide
])
def test_im2col_gemm_runs_the_pointwise_kernel(shape, out_channels, k, strides, padding):
    # k x k layers through GEMM gather their patches in the pointwise kernel's prologue and
    # take its tile (not a generic matmul schedule).
    from tvmq.passes.conv_to_gemm import POINTWISE_NAME

    w = RNG.normal(0, 0.3, (out_channels, shape[1], k, k)).astype(np.float32)
    x = RNG.normal(size=shape).astype(np.float32)
    vm, kernels = _compiled_conv(shape, w, strides, padding, (1, 1), "float32",
                                 policy=ConvPolicy.GEMM)
    assert any(POINTWISE_NAME in name for name in kernels)
    assert not any("im2col" in name for name in kernels)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, strides, padding, (1, 1), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pointwise_image_rows():
    from tvmq.passes.conv_to_gemm import pointwise_image_rows

    assert pointwise_image_rows(56, 56, 16) == 2
    assert pointwise_image_rows(28, 28, 16) == 4
    assert pointwise_image_rows(112, 112, 16) == 1
    assert pointwise_image_rows(14, 14, 16) is None
    assert pointwise_image_rows(7, 7, 8) is None


def test_int8_conv_uses_sdot_with_dotprod():
    # int8 quads tensorized with sdot on AArch64 with the dot product (cross-compiled);
    # without it, int32 products.
    w = RNG.integers(-128, 128, (16, 6, 3, 3)).astype(np.int8)
    assert "sdot" in _assembly((1, 6, 8, 8), w, "int32", target="aarch64-dotprod")
    assert "sdot" not in _assembly((1, 6, 8, 8), w, "int32", target="aarch64")


@pytest.mark.skipif(not _VNNI.runs_here(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("shape, out_channels", [
    ((1, 24, 8, 16), 12),   # one 16-pixel row per vector, 12 channels per tile
    ((1, 8, 4, 16), 64),    # an expansion: channel blocks outermost
    ((1, 64, 4, 16), 8),    # a reduction: pixel blocks outermost
    ((1, 6, 7, 7), 16),     # 6 channels (a padded quad), 49 pixels padded to 64
    ((1, 16, 14, 14), 32),  # 196 pixels padded to 208
    ((1, 12, 8, 28), 24),   # 4 rows of 28 = 7 vectors per tile
])
def test_uint8_pointwise_quads_is_exact(shape, out_channels):
    from tvmq.passes.conv_to_gemm import POINTWISE_QUADS_NAME

    w = RNG.integers(-128, 128, (out_channels, shape[1], 1, 1)).astype(np.int8)
    x = RNG.integers(0, 256, shape).astype(np.uint8)
    executable, kernels = _build(
        _conv_module(shape, w, (1, 1), (0, 0, 0, 0), (1, 1), "int32", data_dtype="uint8"),
        policy=ConvPolicy.GEMM, target="x86-vnni")
    assert any(POINTWISE_QUADS_NAME in name for name in kernels)
    asm = "".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "vpdpbusd %zmm" in asm.replace("\t", " ")
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = 2 * reference_conv(x, w, (1, 1), (0, 0, 0, 0), (1, 1), np.int64)
    assert np.array_equal(got, want)


def test_uint8_pointwise_layers_predict_the_quad_kernel_where_rows_make_vectors():
    from tvmq.passes._conv import Conv2D, IntDot
    from tvmq.passes.conv_algorithm import ConvAlgorithm, candidates, predict

    def conv(c, h, w, dtype="uint8"):
        data = relax.Var("x", relax.TensorType((1, c, h, w), dtype))
        weight = np.zeros((32, c, 1, 1), np.int8)
        return Conv2D(data=data, weight=weight, strides=(1, 1), padding=(0, 0, 0, 0),
                      dilation=(1, 1), groups=1, out_dtype="int32", data_shape=(1, c, h, w))

    assert predict(conv(16, 56, 56), 32, IntDot.QUADS) == ConvAlgorithm.GEMM
    assert predict(conv(16, 14, 14), 32, IntDot.QUADS) == ConvAlgorithm.DIRECT  # padded
    assert ConvAlgorithm.GEMM in candidates(conv(16, 14, 14), 32, IntDot.QUADS)
    assert candidates(conv(16, 56, 56, "int8"), 32, IntDot.QUADS) == [ConvAlgorithm.DIRECT]
    assert candidates(conv(16, 56, 56), 16, IntDot.PAIRS) == [ConvAlgorithm.DIRECT]  # AVX2


@pytest.mark.parametrize("op, shape, pool, strides, padding", [
    ("max", (1, 8, 17, 17), (3, 3), (2, 2), (1, 1, 1, 1)),   # ResNet's stem pool, odd size
    ("max", (1, 4, 16, 16), (2, 2), (2, 2), (0, 0, 0, 0)),   # VGG's
    ("avg", (1, 6, 9, 12), (3, 3), (1, 1), (1, 1, 1, 1)),    # an average's division epilogue
    ("avg", (1, 16, 7, 7), (7, 7), (1, 1), (0, 0, 0, 0)),    # a global pool as a window
])
def test_window_pooling_matches_numpy(op, shape, pool, strides, padding):
    """schedules/cpu_pool.py: the padding inlined, rows in parallel, taps outer."""
    x = RNG.normal(size=shape).astype(np.float32)
    builder = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(shape, "float32"))
    make = relax.op.nn.max_pool2d if op == "max" else relax.op.nn.avg_pool2d
    with builder.function("main", [var]):
        with builder.dataflow():
            out = builder.emit_output(make(var, pool, strides, padding))
        builder.emit_func_output(out)
    executable, _ = _build(builder.get())
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    top, left, bottom, right = padding
    fill = -np.inf if op == "max" else np.nan
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    (kh, kw), (sh, sw) = pool, strides
    oh = (padded.shape[2] - kh) // sh + 1
    ow = (padded.shape[3] - kw) // sw + 1
    windows = np.stack([padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
                        for i in range(kh) for j in range(kw)])
    # TVM's average excludes the padding by default (count_include_pad=False).
    want = windows.max(0) if op == "max" else np.nanmean(windows, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_float_1x1_layers_predict_the_pointwise_kernel():
    # On AVX-512 (weight blocks of 32): 1x1 layers whose output rows make whole vectors take
    # the pointwise GEMM, strided ones over the subsampled input, except reductions of 256+
    # channels to 64 or fewer; 14x14 outputs do not make vectors.
    from tvmq.passes._conv import Conv2D
    from tvmq.passes.conv_algorithm import ConvAlgorithm, predict

    def conv(c, o, size, stride=1):
        data = relax.Var("x", relax.TensorType((1, c, size, size), "float32"))
        return Conv2D(data=data, weight=np.zeros((o, c, 1, 1), np.float32),
                      strides=(stride, stride), padding=(0, 0, 0, 0), dilation=(1, 1),
                      groups=1, out_dtype="float32", data_shape=(1, c, size, size))

    assert predict(conv(64, 256, 56), 32) == ConvAlgorithm.GEMM
    assert predict(conv(256, 128, 56), 32) == ConvAlgorithm.GEMM
    assert predict(conv(512, 128, 28), 32) == ConvAlgorithm.GEMM
    assert predict(conv(256, 512, 56, stride=2), 32) == ConvAlgorithm.GEMM   # 28 wide out
    assert predict(conv(256, 64, 56), 32) == ConvAlgorithm.DIRECT
    assert predict(conv(1024, 256, 14), 32) == ConvAlgorithm.DIRECT
    assert predict(conv(512, 1024, 28, stride=2), 32) == ConvAlgorithm.DIRECT  # 14 wide out


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_depthwise_copies_whole_plane_rows_per_channel(strides, dtype):
    # Per channel, under the parallel channel loop: the planes in whole rows (no predicate
    # on the copy); a strided layer's padded image is a block of its own, its phases read
    # from it with no bound check.
    from tvm import te
    from tvmq.passes.conv_blocked import conv2d_depthwise
    from tvmq.schedules.cpu_conv import DepthwiseConv
    from tvmq.schedules.kernel_layouts import DEPTHWISE_PAD

    data = te.placeholder((1, 8, 32, 32), dtype, name="data")
    weight = te.placeholder((8, 1, 3, 3), "int8" if dtype == "uint8" else dtype, name="w")
    out = conv2d_depthwise(data, weight, strides, (1, 1, 1, 1), (1, 1),
                           "int32" if dtype == "uint8" else dtype, 16)
    target = tvmq.targets.resolve("x86-avx512").tvm_target()
    sch = DepthwiseConv().apply(te.create_prim_func([data, weight, out]), target, False)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    plane_loops = sch.get_loops(sch.get_sblock("data_plane"))
    channel = sch.get(sch.get_loops(sch.get_sblock("conv2d_depthwise_update"))[0])
    assert sch.get(plane_loops[0]).same_as(channel)
    assert channel.kind == tvm.tirx.ForKind.PARALLEL
    assert "T.where" not in str(sch.get(plane_loops[1]))
    assert (DEPTHWISE_PAD in names) == (strides != (1, 1))
    if strides != (1, 1):
        assert "if_then_else" not in str(sch.get(sch.get_sblock("data_plane")).body)
