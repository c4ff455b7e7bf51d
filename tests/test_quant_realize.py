"""RealizeQuantization: each integer kernel equals a numpy reference of the same integer
arithmetic exactly, stays within one output step of the simulated (QDQ) op, and the
uint8 (VNNI) form gives identical results. Plus the passes composed in Sequential."""

import numpy as np
import pytest
import tvm
from numpy.lib.stride_tricks import sliding_window_view
from tvm import relax
from tvmq.passes import AnnotateQuantization, Calibrate, RealizeQuantization
from tvmq.passes._observe import build
from tvmq.passes._qdq import fixed_point

from tvmq.errors import CalibrationError

RNG = np.random.default_rng(7)
SX, ZX = 0.05, -7  # input scale / zero point
SY, ZY = 0.11, 5  # output scale / zero point


def _rshift_round(value, mult, shift):
    value = value.astype(np.int64) * mult
    return (value + (np.int64(1) << (shift - 1))) >> shift


def _requant(acc, real, zero, lo=-128, hi=127, axis=None, ndim=None):
    mult, shift = fixed_point(np.asarray(real).reshape(-1))
    if axis is not None and mult.size > 1:
        shape = [1] * ndim
        shape[axis] = -1
        mult, shift = mult.reshape(shape), shift.reshape(shape)
    else:
        mult, shift = mult.reshape(()), shift.reshape(())
    return np.clip(_rshift_round(acc, mult, shift) + zero, lo, hi).astype(np.int8)


def _conv_int(x, w, pad, zero, stride=1, groups=1):
    """sum((x - zero) * w) over each window, x padded with zero (the real 0)."""
    x = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (pad, pad), (pad, pad)],
               constant_values=zero) - zero
    o, cg, kh, kw = w.shape
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    out = []
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        patch = windows[:, g * cg:(g + 1) * cg]
        out.append(np.einsum("nchwij,cij->nhw", patch, w[oc].astype(np.int64)))
    return np.stack(out, axis=1)


def _random_input(shape, scale=SX, zero=ZX):
    ints = RNG.integers(-128, 128, shape).astype(np.int8)
    return ints, ((ints.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)


def _module(make, shapes, out_scale=SY, out_zero=ZY):
    """main(x...) = quantize(make(dequantize(quantize(x))...)): int8 in the simulated form."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    scale, zero = relax.const(SX, "float32"), relax.const(ZX, "int8")
    with bb.function("main", params):
        with bb.dataflow():
            dqs = [bb.emit(relax.op.dequantize(bb.emit(relax.op.quantize(p, scale, zero)),
                                               scale, zero)) for p in params]
            y = bb.emit(make(*dqs))
            if out_scale is not None:
                y = bb.emit(relax.op.quantize(y, relax.const(out_scale, "float32"),
                                              relax.const(out_zero, "int8")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, inputs):
    vm = build(mod["main"])
    return vm["main"](*(tvm.runtime.tensor(x) for x in inputs)).numpy()


def _assert_bindings_typed_as_values(func):
    """Every binding's declared dtype is its value's (a stale int8 annotation on a uint8
    quantize built the kernels that read it for int8 data)."""
    for var, value in relax.analysis.get_var2val(func).items():
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.quantize":
            assert str(var.ty.dtype) == str(value.attrs.out_dtype), var.name


def _check(mod, inputs, expected):
    realized = RealizeQuantization()(mod)
    ops = {str(v.op.name) for v in relax.analysis.get_var2val(realized["main"]).values()
           if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)}
    assert "relax.dequantize" not in ops, "the layer still dequantizes"
    got = _run(realized, inputs)
    np.testing.assert_array_equal(got, expected)
    simulated = _run(mod, inputs)
    assert np.abs(simulated.astype(int) - got.astype(int)).max() <= 1
    # uint8 activations (zero point + 128): the same integers, shifted.
    shifted = RealizeQuantization(unsigned_activations=True)(mod)
    _assert_bindings_typed_as_values(shifted["main"])
    unsigned = _run(shifted, inputs)
    assert unsigned.dtype == np.uint8
    np.testing.assert_array_equal(unsigned.astype(int) - 128, expected)


def _weights(shape, axis=0):
    w = RNG.normal(0, 0.3, shape).astype(np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
    scale = (np.abs(moved).max(axis=1) / 127).astype(np.float32)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(bshape)), -127, 127).astype(np.int8)
    return q, scale


def _dq_weight(q, scale, axis):
    return relax.op.dequantize(relax.const(q, "int8"), relax.const(scale, "float32"),
                               relax.const(0, "int8"), axis=axis)


@pytest.mark.parametrize(("groups", "channels", "relu"), [(1, 4, True), (2, 4, False),
                                                          (4, 4, True)])
def test_conv2d_grouped_depthwise_bit_exact(groups, channels, relu):
    out_channels = 6 if groups != channels else channels
    wq, ws = _weights((out_channels, channels // groups, 3, 3))
    bias = RNG.normal(0, 0.5, (out_channels,)).astype(np.float32)

    def make(x):
        y = relax.op.nn.conv2d(x, _dq_weight(wq, ws, 0), padding=[1, 1, 1, 1], groups=groups)
        y = relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1), "float32"))
        return relax.op.nn.relu(y) if relu else y

    xq, x = _random_input((1, channels, 6, 6))
    acc_scale = SX * ws.astype(np.float64)
    acc = _conv_int(xq, wq, 1, ZX, groups=groups)
    acc = acc + np.round(bias / acc_scale).astype(np.int64).reshape(1, -1, 1, 1)
    expected = _requant(acc, acc_scale / SY, ZY, lo=ZY if relu else -128, axis=1, ndim=4)
    _check(_module(make, [x.shape]), [x], expected)


def test_matmul_bit_exact_and_float_output():
    wq, ws = _weights((16, 5), axis=1)
    bias = RNG.normal(0, 0.5, (5,)).astype(np.float32)

    def make(x):
        return relax.op.add(relax.op.matmul(x, _dq_weight(wq, ws, 1)), relax.const(bias))

    xq, x = _random_input((2, 16))
    acc_scale = SX * ws.astype(np.float64)
    acc = (xq.astype(np.int64) - ZX) @ wq.astype(np.int64)
    acc = acc + np.round(bias / acc_scale).astype(np.int64)
    _check(_module(make, [x.shape]), [x], _requant(acc, acc_scale / SY, ZY, axis=1, ndim=2))
    # With no quantize after it, the layer ends in one dequantize of its int32 accumulator.
    got = _run(RealizeQuantization()(_module(make, [x.shape], out_scale=None)), [x])
    np.testing.assert_array_equal(got, acc.astype(np.float32) * acc_scale.astype(np.float32))


def test_residual_add_bit_exact():
    aq, a = _random_input((1, 3, 4, 4))
    bq, b = _random_input((1, 3, 4, 4))
    mult, shift = fixed_point(np.array([SX / SY, SX / SY]), common=True)
    total = (aq.astype(np.int64) - ZX) * mult[0] + (bq.astype(np.int64) - ZX) * mult[1]
    total = (total + (np.int64(1) << (shift[0] - 1))) >> shift[0]
    expected = np.clip(total + ZY, ZY, 127).astype(np.int8)
    mod = _module(lambda x, y: relax.op.nn.relu(relax.op.add(x, y)), [a.shape, b.shape])
    _check(mod, [a, b], expected)


def test_concat_bit_exact():
    aq, a = _random_input((1, 2, 3, 3))
    bq, b = _random_input((1, 3, 3, 3))
    expected = np.concatenate(
        [_requant(q.astype(np.int64) - ZX, SX / SY, ZY) for q in (aq, bq)], axis=1
    )
    mod = _module(lambda x, y: relax.op.concat([x, y], axis=1), [a.shape, b.shape])
    _check(mod, [a, b], expected)


def test_pools_bit_exact():
    xq, x = _random_input((1, 3, 6, 6))
    wide = xq.astype(np.int64) - ZX
    windows = sliding_window_view(wide, (2, 2), axis=(2, 3))[:, :, ::2, ::2]
    cases = [
        (lambda v: relax.op.nn.max_pool2d(v, pool_size=[2, 2], strides=[2, 2]),
         _requant(windows.max(axis=(4, 5)), SX / SY, ZY)),
        (lambda v: relax.op.nn.avg_pool2d(v, pool_size=[2, 2], strides=[2, 2]),
         _requant(windows.sum(axis=(4, 5)), SX / (SY * 4), ZY)),
        (lambda v: relax.op.mean(v, axis=[2, 3], keepdims=True),
         _requant(wide.sum(axis=(2, 3), keepdims=True), SX / (SY * 36), ZY)),
        (lambda v: relax.op.nn.adaptive_avg_pool2d(v, output_size=[1, 1]),
         _requant(wide.sum(axis=(2, 3), keepdims=True), SX / (SY * 36), ZY)),
    ]
    for make, expected in cases:
        _check(_module(make, [x.shape]), [x], expected)
    # Same scale in and out: max-pool runs on the integers as they are.
    same = _module(lambda v: relax.op.nn.max_pool2d(v, pool_size=[2, 2], strides=[2, 2]),
                   [x.shape], out_scale=SX, out_zero=ZX)
    _check(same, [x], windows.max(axis=(4, 5)).astype(np.int64).__add__(ZX).astype(np.int8))


def test_no_qdq_is_unchanged_and_realize_is_idempotent():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(RealizeQuantization()(mod), mod)
    wq, ws = _weights((8, 4), axis=1)
    qdq = _module(lambda v: relax.op.matmul(v, _dq_weight(wq, ws, 1)), [(1, 8)])
    once = RealizeQuantization()(qdq)
    tvm.ir.assert_structural_equal(RealizeQuantization()(once), once)


def _float_model():
    """conv + bias + relu -> max-pool -> conv (residual add) -> mean -> dense."""
    w1 = RNG.normal(0, 0.4, (8, 2, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w3 = RNG.normal(0, 0.3, (8, 4)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=[1, 1, 1, 1]))
            y = bb.emit(relax.op.add(y, relax.const(np.full((1, 8, 1, 1), 0.1, np.float32))))
            y = bb.emit(relax.op.nn.relu(y))
            p = bb.emit(relax.op.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2]))
            z = bb.emit(relax.op.nn.conv2d(p, relax.const(w2), padding=[1, 1, 1, 1]))
            z = bb.emit(relax.op.nn.relu(relax.op.add(p, z)))
            m = bb.emit(relax.op.mean(z, axis=[2, 3]))
            out = bb.emit_output(relax.op.matmul(m, relax.const(w3)))
        bb.emit_func_output(out)
    return bb.get()


def test_passes_compose_in_sequential_with_tvm_passes():
    mod = _float_model()
    data = [{"x": RNG.random((1, 2, 8, 8), dtype=np.float32)} for _ in range(16)]
    seq = tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        AnnotateQuantization(),
        Calibrate(data, "percentile", percentile=99.9, report_batches=4),
        RealizeQuantization(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
    ])
    quantized = seq(mod)
    calls = [v for v in relax.analysis.get_var2val(quantized["main"]).values()
             if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)]
    convs = [c for c in calls if c.op.name in ("relax.nn.conv2d", "relax.matmul")]
    assert len(convs) == 3 and all(c.attrs.out_dtype == "int32" for c in convs)
    assert all(str(c.args[0].ty.dtype) == "int8" for c in convs)
    lowered = relax.transform.LegalizeOps()(quantized)  # composes with lowering too
    assert "main" in [gv.name_hint for gv in lowered.get_global_vars()]
    x = RNG.random((1, 2, 8, 8), dtype=np.float32)
    ref, got = _run(mod, [x]), _run(quantized, [x])
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_calibrate_rejects_bad_data_with_its_message():
    mod = AnnotateQuantization()(relax.transform.FoldConstant()(_float_model()))
    bad = [{"x": np.zeros((1, 2, 8, 8), np.float64)}]
    with pytest.raises(CalibrationError, match=r"input 'x' has dtype float64"):
        Calibrate(bad)(mod)


def test_all_zero_tensor_gets_a_safe_scale():
    mod = AnnotateQuantization()(relax.transform.FoldConstant()(_float_model()))
    zeros = [{"x": np.zeros((1, 2, 8, 8), np.float32)}] * 2
    calibrated = Calibrate(zeros, report_batches=0)(mod)
    out = _run(RealizeQuantization()(calibrated), [zeros[0]["x"]])
    assert np.all(np.isfinite(out))
