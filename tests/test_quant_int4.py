"""INT4 weights (W4A8): packed two per byte, unpacked inside the kernel, bit-exact against a
numpy reference of the integer arithmetic, and the weight constants really halve."""

import numpy as np
import pytest
import tvm
from test_quant_realize import SX, SY, ZX, ZY, _conv_int, _module, _requant
from tvm import relax
from tvm.ir.expr import Constant
from tvmq.passes import RealizeQuantization
from tvmq.passes._int4 import factor_groups, pack_int4, unpack_int4
from tvmq.passes._observe import host_target
from tvmq.passes._qdq import REPORT_ATTR, quantize_weight, quantize_weight_grouped, with_json_attr
from tvmq.passes.conv_blocked import KERNEL_NAME
from tvmq.passes.conv_to_gemm import POINTWISE_QUADS_NAME
from tvmq.passes.matmul_blocked import KERNEL_NAME as MATMUL_KERNEL

import tvmq
from tvmq.errors import ConfigError
from tvmq.qconfig import QConfig

RNG = np.random.default_rng(11)


def _random_input(shape):
    # Our own generator: drawing from test_quant_realize's would change its tests' data.
    ints = RNG.integers(-128, 128, shape).astype(np.int8)
    return ints, ((ints.astype(np.float32) - ZX) * np.float32(SX)).astype(np.float32)


def _int4_weights(shape, axis):
    return quantize_weight(RNG.normal(0, 0.3, shape).astype(np.float32), axis=axis, bits=4)


def _dq(q, scale, axis):
    return relax.op.dequantize(relax.const(q, "int8"), relax.const(scale, "float32"),
                               relax.const(0, "int8"), axis=axis)


def _run(mod, inputs):
    """Build the whole module (main and the int4 kernels realize added) for this CPU."""
    target = host_target()
    mod = relax.transform.ConvertToDataflow(min_size=1)(mod)
    with target:
        mod = relax.get_default_pipeline(target)(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(x) for x in inputs)).numpy()


def _constants(mod):
    found = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: found.append(e.value.numpy()) if isinstance(e, Constant)
        and hasattr(e.value, "numpy") else None,
    )
    return found


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_pack_roundtrip_covers_every_int4_value(count):
    values = RNG.integers(-8, 8, count).astype(np.int8)
    values[: min(count, 16)] = np.arange(-8, 8)[: min(count, 16)]
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, values.shape), values)
    # Low nibble first: [-1, 2] -> 0x2F.
    assert pack_int4(np.array([-1, 2]))[0] == 0x2F


@pytest.mark.parametrize(("groups", "channels", "relu"), [(1, 4, True), (2, 4, False),
                                                          (4, 4, True)])
def test_int4_conv2d_bit_exact_and_packed(groups, channels, relu):
    out_channels = 6 if groups != channels else channels
    wq, ws = _int4_weights((out_channels, channels // groups, 3, 3), 0)
    bias = RNG.normal(0, 0.5, (out_channels,)).astype(np.float32)

    def make(x):
        y = relax.op.nn.conv2d(x, _dq(wq, ws, 0), padding=[1, 1, 1, 1], groups=groups)
        y = relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1), "float32"))
        return relax.op.nn.relu(y) if relu else y

    xq, x = _random_input((1, channels, 6, 6))
    acc_scale = SX * ws.astype(np.float64)
    acc = _conv_int(xq, wq, 1, ZX, groups=groups)
    acc = acc + np.round(bias / acc_scale).astype(np.int64).reshape(1, -1, 1, 1)
    expected = _requant(acc, acc_scale / SY, ZY, lo=ZY if relu else -128, axis=1, ndim=4)
    mod = _module(make, [x.shape])
    realized = RealizeQuantization()(mod)
    np.testing.assert_array_equal(_run(realized, [x]), expected)
    unsigned = _run(RealizeQuantization(unsigned_activations=True)(mod), [x])
    np.testing.assert_array_equal(unsigned.astype(int) - 128, expected)
    if groups == channels:
        # Depthwise: int4 values kept in int8 for the INT8 depthwise kernel (stores_packed).
        assert [c for c in _constants(realized) if c.dtype == np.int8 and c.size == wq.size]
        assert not any(gv.name_hint.startswith("conv2d_int4")
                       for gv in realized.get_global_vars())
        return
    # The weights live in the module packed: uint8, half the int8 bytes, no int8 copy.
    packed = [c for c in _constants(realized) if c.dtype == np.uint8]
    assert [c.size for c in packed] == [(wq.size + 1) // 2]
    np.testing.assert_array_equal(unpack_int4(packed[0], wq.shape), wq)
    assert not [c for c in _constants(realized) if c.dtype == np.int8 and c.size == wq.size]
    assert any(gv.name_hint.startswith("conv2d_int4") for gv in realized.get_global_vars())


def test_int4_matmul_bit_exact():
    wq, ws = _int4_weights((16, 5), 1)
    bias = RNG.normal(0, 0.5, (5,)).astype(np.float32)

    def make(x):
        return relax.op.add(relax.op.matmul(x, _dq(wq, ws, 1)), relax.const(bias))

    xq, x = _random_input((2, 16))
    acc_scale = SX * ws.astype(np.float64)
    acc = (xq.astype(np.int64) - ZX) @ wq.astype(np.int64)
    acc = acc + np.round(bias / acc_scale).astype(np.int64)
    realized = RealizeQuantization()(_module(make, [x.shape]))
    np.testing.assert_array_equal(_run(realized, [x]),
                                  _requant(acc, acc_scale / SY, ZY, axis=1, ndim=2))
    assert any(gv.name_hint.startswith("matmul_int4") for gv in realized.get_global_vars())


def test_int4_survives_the_build_pipeline_packed():
    # Constant folding in the backend must not widen the packed weights back to int8.
    wq, ws = _int4_weights((8, 4, 3, 3), 0)
    mod = _module(lambda x: relax.op.nn.conv2d(x, _dq(wq, ws, 0), padding=[1, 1, 1, 1]),
                  [(1, 4, 5, 5)])
    import tvmq
    from tvmq.build import run_passes
    from tvmq.pipeline import pipeline

    preset = tvmq.targets.resolve("x86")
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = run_passes(mod, pipeline(preset))
    sizes = sorted(c.size for c in _constants(lowered) if c.ndim and c.size >= 16)
    assert (wq.size + 1) // 2 in sizes and wq.size not in sizes


def _grouped_module(make, shape, group):
    mod = _module(make, [shape])
    main = with_json_attr(mod["main"], REPORT_ATTR, {"weight_group_size": group})
    return tvm.IRModule({"main": main})


@pytest.mark.parametrize("group", [4, 8])
def test_groupwise_int4_conv2d_bit_exact(group):
    w = RNG.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)
    w[:, :2] *= 0.1  # groups with a much smaller range get a smaller multiplier
    w_int, ws = quantize_weight_grouped(w, axis=0, bits=4, group_size=group)
    q, mult = factor_groups(w_int, axis=0, group_size=group)
    assert q.min() >= -8 and q.max() <= 7 and mult.shape == (6, -(-36 // group))
    assert len(np.unique(mult)) > 1
    # Group-wise tracks the weights more closely than one scale per channel.
    q4, s4 = quantize_weight(w, axis=0, bits=4)
    grouped_error = np.abs(w_int * ws.reshape(-1, 1, 1, 1) - w).mean()
    assert grouped_error < np.abs(q4 * s4.reshape(-1, 1, 1, 1) - w).mean()

    mod = _grouped_module(
        lambda x: relax.op.nn.conv2d(x, _dq(w_int, ws, 0), padding=[1, 1, 1, 1]),
        (1, 4, 6, 6), group,
    )
    xq, x = _random_input((1, 4, 6, 6))
    acc = _conv_int(xq, w_int, 1, ZX)
    expected = _requant(acc, SX * ws.astype(np.float64) / SY, ZY, axis=1, ndim=4)
    realized = RealizeQuantization()(mod)
    np.testing.assert_array_equal(_run(realized, [x]), expected)
    consts = _constants(realized)
    packed = [c for c in consts if c.dtype == np.uint8 and c.ndim == 1]
    assert [c.size for c in packed] == [w.size // 2]
    assert not [c for c in consts if c.dtype == np.int8 and c.size == w.size]


def test_groupwise_int4_matmul_bit_exact():
    w = RNG.normal(0, 0.3, (16, 5)).astype(np.float32)
    w_int, ws = quantize_weight_grouped(w, axis=1, bits=4, group_size=4)
    mod = _grouped_module(lambda x: relax.op.matmul(x, _dq(w_int, ws, 1)), (2, 16), 4)
    xq, x = _random_input((2, 16))
    acc = (xq.astype(np.int64) - ZX) @ w_int.astype(np.int64)
    expected = _requant(acc, SX * ws.astype(np.float64) / SY, ZY, axis=1, ndim=2)
    realized = RealizeQuantization()(mod)
    np.testing.assert_array_equal(_run(realized, [x]), expected)
    assert any(gv.name_hint.startswith("matmul_int4") for gv in realized.get_global_vars())


def test_groupwise_needs_a_valid_group_size():
    with pytest.raises(ConfigError, match="weight_group_size=1 is not valid"):
        QConfig(weight_bits=4, weight_group_size=1)


# Targets whose blocked kernels take INT4 layers: int16 pairs (AVX2, AVX-512 without VNNI)
# and uint8 quads (VNNI), where this CPU runs them.
BLOCKED_TARGETS = [
    pytest.param(name, marks=pytest.mark.skipif(
        not tvmq.targets.resolve(name).runs_here(), reason=f"this CPU cannot run {name}"))
    for name in ("x86-avx2", "x86-avx512", "x86-vnni")
]


def _through_tvmq(mod, target, inputs):
    """(output, lowered module) of ``mod`` built by tvmq's pipeline for ``target``; VNNI
    targets keep activations unsigned, so their int8 output comes back shifted by 128.
    FoldConstant is left out: in a compile the weight dequantizes appear after it (annotate),
    and folded group-wise weights no longer factor back into int4 x multiplier."""
    preset = tvmq.targets.resolve(target)
    config = tvmq.CompileConfig(disabled_passes=("FoldConstant",))
    with preset.tvm_target(), tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset, config))(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None),
                              tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in inputs)).numpy()
    if out.dtype == np.uint8:
        out = out.astype(np.int64) - 128
    return out, lowered


def _int4_kernels(lowered) -> list[str]:
    return [f.script() for gv, f in lowered.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and "int4" in gv.name_hint]


def _int4_conv_weight(w, group):
    """(int4 values, scales) per output channel, or group-wise with ``group`` channels."""
    if group:
        return quantize_weight_grouped(w, axis=0, bits=4, group_size=group)
    return quantize_weight(w, axis=0, bits=4)


@pytest.mark.parametrize("target", BLOCKED_TARGETS)
@pytest.mark.parametrize("group", [0, 4])
def test_int4_conv_as_blocked_kernel_bit_exact(target, group):
    # 5 input channels: the pair and quad forms pad them to whole groups.
    w = RNG.normal(0, 0.3, (16, 5, 3, 3)).astype(np.float32)
    w_int, ws = _int4_conv_weight(w, group)
    mod = _grouped_module(
        lambda x: relax.op.nn.relu(relax.op.nn.conv2d(x, _dq(w_int, ws, 0),
                                                      padding=[1, 1, 1, 1])),
        (1, 5, 7, 7), group)
    xq, x = _random_input((1, 5, 7, 7))
    acc = _conv_int(xq, w_int, 1, ZX)
    expected = _requant(acc, SX * ws.astype(np.float64) / SY, ZY, lo=ZY, axis=1, ndim=4)
    out, lowered = _through_tvmq(mod, target, [x])
    np.testing.assert_array_equal(out, expected)
    kernels = _int4_kernels(lowered)
    assert kernels and all(KERNEL_NAME in k for k in kernels)
    # Two per byte, in the kernel's layout: input channels padded to 6 (pairs) or 8 (quads).
    channels = 8 if target == "x86-vnni" else 6
    packed = [c.size for c in _constants(lowered) if c.dtype == np.uint8 and c.ndim == 1]
    assert packed == [16 * channels * 9 // 2]
    assert not [c for c in _constants(lowered) if c.dtype == np.int8 and c.size >= w.size]


@pytest.mark.parametrize("group", [0, 4])
def test_int4_pointwise_as_quad_kernel_bit_exact(group):
    # A 1x1 uint8 layer on VNNI whose image rows make whole vectors (16x16): its INT8 form
    # is the quad pointwise kernel, and its INT4 form that kernel with the unpack before it
    # (it ran the blocked direct kernel: MobileNetV2 INT4 5.69 -> 4.15 ms, INT8 3.91).
    # 6 input channels: the quads pad them to 8.
    w = RNG.normal(0, 0.3, (32, 6, 1, 1)).astype(np.float32)
    w_int, ws = _int4_conv_weight(w, group)
    mod = _grouped_module(
        lambda x: relax.op.nn.relu(relax.op.nn.conv2d(x, _dq(w_int, ws, 0))), (1, 6, 16, 16),
        group)
    xq, x = _random_input((1, 6, 16, 16))
    acc = _conv_int(xq, w_int, 0, ZX)
    expected = _requant(acc, SX * ws.astype(np.float64) / SY, ZY, lo=ZY, axis=1, ndim=4)
    out, lowered = _through_tvmq(mod, "x86-vnni", [x])
    np.testing.assert_array_equal(out, expected)
    kernels = _int4_kernels(lowered)
    assert kernels and all(POINTWISE_QUADS_NAME in k and "unpack_int4" in k for k in kernels)
    packed = [c.size for c in _constants(lowered) if c.dtype == np.uint8 and c.ndim == 1]
    assert packed == [32 * 8 // 2]


@pytest.mark.parametrize("target", BLOCKED_TARGETS)
@pytest.mark.parametrize("group", [0, 8])
@pytest.mark.parametrize("columns", [32, 60])  # 60: padded to 64 (a 1000-class layer's case)
def test_int4_matmul_as_blocked_kernel_bit_exact(target, group, columns):
    w = RNG.normal(0, 0.3, (24, columns)).astype(np.float32)
    if group:
        w_int, ws = quantize_weight_grouped(w, axis=1, bits=4, group_size=group)
    else:
        w_int, ws = quantize_weight(w, axis=1, bits=4)
    mod = _grouped_module(lambda x: relax.op.matmul(x, _dq(w_int, ws, 1)), (3, 24), group)
    xq, x = _random_input((3, 24))
    acc = (xq.astype(np.int64) - ZX) @ w_int.astype(np.int64)
    expected = _requant(acc, SX * ws.astype(np.float64) / SY, ZY, axis=1, ndim=2)
    out, lowered = _through_tvmq(mod, target, [x])
    np.testing.assert_array_equal(out, expected)
    kernels = _int4_kernels(lowered)
    assert kernels and all(MATMUL_KERNEL in k for k in kernels)
