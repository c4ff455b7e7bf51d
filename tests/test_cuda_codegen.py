"""CUDA tensor-core kernels built without a GPU: fp16, int8 and int4 matmuls, fp16 and W4A4
convs.

The code-generation tests check the CUDA C that ``tvmq.compile`` produces for each
sm_8x / sm_90 preset; the numeric tests run the artifacts and need a GPU (``-m gpu``
selects them; without a GPU they skip).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmq.passes._int4 import int4_matmul, pack_int4_te
from tvmq.passes._int4 import pack_int4_rows as pack_int4
from tvmq.passes._int4 import unpack_int4_rows as unpack_int4
from tvmq.schedules.cuda_int4 import Int4TensorCoreMatmul

import tvmq

SM8X = ["cuda-sm80", "cuda-sm86", "cuda-sm89"]
ALL = [*SM8X, "cuda-sm90"]
WMMA = "nvcuda::wmma::mma_sync"
S4_FRAGMENT = "nvcuda::wmma::experimental::precision::s4"

needs_gpu = pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs an NVIDIA GPU")


def _matmul(dtype: str, out_dtype: str, m=256, n=256, k=256) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((m, k), dtype))
    b = relax.Var("b", relax.TensorType((k, n), dtype))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b, out_dtype=out_dtype))
        bb.emit_func_output(out)
    return bb.get()


def _conv_fp16() -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 16, 16), "float16"))
    weight = relax.const(rng.standard_normal((64, 32, 3, 3)).astype("float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, weight, padding=(1, 1)))
        bb.emit_func_output(out)
    return bb.get()


def _int4_matmul(weight: np.ndarray, m=128) -> tvm.IRModule:
    """x (int4 values in int8) @ weight.T: packed at run time, weight packed here."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, weight.shape[1]), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            packed = bb.emit_te(pack_int4_te, x, primfunc_name_hint="pack_int4")
            out = bb.emit_te(int4_matmul, packed, relax.const(pack_int4(weight)),
                             primfunc_name_hint="int4_matmul")
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def _cuda(artifact) -> str:
    return artifact.device_sources()["cuda"]


@pytest.fixture(scope="module")
def int4_weight() -> np.ndarray:
    return np.random.default_rng(1).integers(-8, 8, size=(128, 256), dtype=np.int8)


@pytest.mark.parametrize("target", ALL)
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_fp16_matmul_uses_tensor_cores(target, out_dtype):
    source = _cuda(tvmq.compile(_matmul("float16", out_dtype), target=target))
    assert WMMA in source
    assert "nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half" in source


@pytest.mark.parametrize("target", ALL)
def test_int8_matmul_uses_tensor_cores(target):
    source = _cuda(tvmq.compile(_matmul("int8", "int32"), target=target))
    assert WMMA in source
    assert "nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, signed char" in source


def test_small_int8_matmul_uses_tensor_cores():
    # TVM's own rule needs every dimension above 64 and crashes on int8; ours pads.
    source = _cuda(tvmq.compile(_matmul("int8", "int32", 48, 32, 96), target="cuda-sm86"))
    assert WMMA in source


def test_fp16_conv_through_gemm_uses_tensor_cores():
    artifact = tvmq.compile(_conv_fp16(), target="cuda-sm86", conv_algorithm="gemm")
    source = _cuda(artifact)
    assert [c["algorithm"] for c in artifact.manifest["conv_algorithms"]] == ["gemm"]
    assert WMMA in source


@pytest.mark.parametrize("target", SM8X)
def test_int4_matmul_uses_s4_tensor_cores(target, int4_weight):
    source = _cuda(tvmq.compile(_int4_matmul(int4_weight), target=target))
    assert S4_FRAGMENT in source
    assert WMMA in source
    # The fragments load straight from the packed bytes staged in shared memory.
    assert "unpack_a" not in source.replace("unpack_a_wmma_matrix_a", "")


def test_int4_rule_is_off_on_sm90_and_odd_shapes():
    rule = Int4TensorCoreMatmul()
    assert not rule.is_target_available(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    a = tvm.te.placeholder((12, 16), "int8", name="a")  # 12 rows: not a multiple of 8
    b = tvm.te.placeholder((8, 16), "int8", name="b")
    func = tvm.te.create_prim_func([a, b, int4_matmul(a, b)])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_86"})
    assert rule.apply(func, target, False) is None


def test_pack_int4_round_trip(int4_weight):
    packed = pack_int4(int4_weight)
    assert packed.shape == (128, 128) and packed.dtype == np.int8
    np.testing.assert_array_equal(unpack_int4(packed), int4_weight)
    # Element 2q sits in the low nibble, the order of the s4 fragments.
    assert pack_int4(np.array([[1, -2]], np.int8)).view(np.uint8)[0, 0] == 0xE1


def _run(artifact, tmp_path, **inputs):
    model = tvmq.runtime.load(artifact.export(tmp_path / "model.tar"))
    return next(iter(model.run(**inputs).values()))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_fp16_matmul_numbers(tmp_path, out_dtype):
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((256, 256)).astype("float16") for _ in range(2))
    got = _run(tvmq.compile(_matmul("float16", out_dtype), target="cuda-sm80"), tmp_path,
               a=a, b=b)
    want = a.astype(np.float32) @ b.astype(np.float32)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(256, 256, 256), (48, 32, 96)])
def test_int8_matmul_numbers(tmp_path, shape):
    m, n, k = shape
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    got = _run(tvmq.compile(_matmul("int8", "int32", m, n, k), target="cuda-sm80"), tmp_path,
               a=a, b=b)
    np.testing.assert_array_equal(got, a.astype(np.int32) @ b.astype(np.int32))


@pytest.mark.gpu
@needs_gpu
def test_int4_matmul_numbers(tmp_path, int4_weight):
    x = np.random.default_rng(4).integers(-8, 8, size=(128, 256), dtype=np.int8)
    got = _run(tvmq.compile(_int4_matmul(int4_weight), target="cuda-sm80"), tmp_path, x=x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ int4_weight.T.astype(np.int32))


@pytest.mark.gpu
@needs_gpu
def test_fp16_conv_numbers(tmp_path):
    mod = _conv_fp16()
    x = np.random.default_rng(5).standard_normal((1, 32, 16, 16)).astype("float16")
    got = _run(tvmq.compile(mod, target="cuda-sm80", conv_algorithm="gemm"), tmp_path, x=x)
    want = _run(tvmq.compile(mod, target="cuda-sm80", conv_algorithm="direct"), tmp_path, x=x)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                               rtol=2e-2, atol=2e-1)


def _w4a4_model(rows=16):
    """[1, rows, 64] -> dense 64x32 + ReLU -> dense 32x32: a transformer's matmuls in small."""
    rng = np.random.default_rng(2)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, 64), "float32"))
    w1 = relax.const(rng.normal(0, 0.2, (64, 32)).astype("float32"))
    w2 = relax.const(rng.normal(0, 0.2, (32, 32)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w1)))
            out = bb.emit_output(relax.op.matmul(y, w2))
        bb.emit_func_output(out)
    calibration = [{"x": rng.random((1, rows, 64), dtype=np.float32)} for _ in range(4)]
    return bb.get(), calibration


def _kernel_bodies(source: str, prefix: str) -> dict[str, str]:
    """The CUDA C definitions of the kernels whose names start with ``prefix``, by name."""
    bodies = {}
    for part in source.split('extern "C" __global__ void')[1:]:
        head, brace, _ = part.partition("{")
        name = re.search(r"(\w+)\(", head.replace("__launch_bounds__(", "")).group(1)
        if brace and name.startswith(prefix):
            bodies[name] = part
    return bodies


@pytest.mark.parametrize("target", SM8X)
def test_w4a4_matmuls_run_on_s4_tensor_cores(target):
    mod, calibration = _w4a4_model()
    artifact = tvmq.compile(mod, target=target, quantize="int4", calibration_data=calibration,
                            qconfig=tvmq.QConfig(activation_bits=4))
    bodies = _kernel_bodies(_cuda(artifact), "int4_matmul")
    assert len(bodies) == 2  # both layers
    assert all(S4_FRAGMENT in body and WMMA in body for body in bodies.values())


@pytest.mark.parametrize(("target", "bits", "rows"), [("cuda-sm86", 8, 16),  # W4A8
                                                      ("cuda-sm90", 4, 16),  # no s4 MMA
                                                      ("cuda-sm86", 4, 12)])  # 12 rows
def test_int4_tensor_cores_only_for_w4a4_that_fits(target, bits, rows):
    mod, calibration = _w4a4_model(rows)
    artifact = tvmq.compile(mod, target=target, quantize="int4", calibration_data=calibration,
                            qconfig=tvmq.QConfig(activation_bits=bits))
    assert S4_FRAGMENT not in _cuda(artifact)
    assert not any(name.startswith("int4_matmul") for name in artifact.manifest["kernels"])


def _realized_w4a4(mod, calibration):
    """(W4A4 realized for s4 tensor cores, the layers' int4 weights as calibrated, the
    realized main's call_tir calls)."""
    from tvmq.passes import AnnotateQuantization, Calibrate, RealizeQuantization

    qconfig = tvmq.QConfig(weight_bits=4, activation_bits=4)
    calibrated = Calibrate(calibration, report_batches=0)(AnnotateQuantization(qconfig)(mod))
    realized = RealizeQuantization(int4_tensor_cores=True)(calibrated)
    weights = [v.args[0].value.numpy() for v in
               relax.analysis.get_var2val(calibrated["main"]).values()
               if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.dequantize"
               and isinstance(v.args[0], tvm.ir.expr.Constant)]
    calls = [v for v in relax.analysis.get_var2val(realized["main"]).values()
             if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir"]
    return realized, weights, calls


def test_w4a4_realize_packs_what_the_tensor_cores_multiply():
    # The int4 kernel cannot run on a CPU; what feeds it can: the weight constant is the
    # layer's int4 weights transposed and packed by rows, and the activation pack kernel
    # packs exactly as numpy does.
    realized, weights, calls = _realized_w4a4(*_w4a4_model())
    matmuls = [c for c in calls if c.args[0].name_hint.startswith("int4_matmul")]
    assert len(matmuls) == 2
    for call, w_int in zip(matmuls, weights, strict=True):
        packed = call.args[1].fields[1].value.numpy()
        np.testing.assert_array_equal(unpack_int4(packed), w_int.T)
    pack = next(c.args[0] for c in calls if c.args[0].name_hint.startswith("pack_int4"))
    prim = realized[pack].with_attr("global_symbol", "main")
    values = np.random.default_rng(3).integers(-8, 8, (1, 16, 64)).astype(np.int8)
    lib = tvm.compile(tvm.IRModule({"main": prim}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((16, 32), np.int8))
    lib["main"](tvm.runtime.tensor(values), out)
    np.testing.assert_array_equal(out.numpy(), pack_int4(values.reshape(16, 64)))


def _w4a4_conv_model():
    """[1, 8, 8, 8] -> conv 3x3 + ReLU -> conv 3x3 stride 2: both on the s4 path."""
    rng = np.random.default_rng(4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 8), "float32"))
    w1 = relax.const(rng.normal(0, 0.3, (16, 8, 3, 3)).astype("float32"))
    w2 = relax.const(rng.normal(0, 0.3, (16, 16, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w1, padding=(1, 1))))
            out = bb.emit_output(relax.op.nn.conv2d(y, w2, strides=(2, 2), padding=(1, 1)))
        bb.emit_func_output(out)
    calibration = [{"x": rng.normal(size=(1, 8, 8, 8)).astype(np.float32)} for _ in range(4)]
    return bb.get(), calibration


@pytest.mark.parametrize("target", SM8X)
def test_w4a4_convs_run_on_s4_tensor_cores(target):
    mod, calibration = _w4a4_conv_model()
    artifact = tvmq.compile(mod, target=target, quantize="int4", calibration_data=calibration,
                            qconfig=tvmq.QConfig(activation_bits=4))
    source = _cuda(artifact)
    bodies = _kernel_bodies(source, "int4_matmul")
    assert len(bodies) == 2  # both convolutions
    assert all(S4_FRAGMENT in body and WMMA in body for body in bodies.values())
    # Each layer's window gather and pack, fused with the quantize or requantize before it.
    packs = [name for name in artifact.manifest["kernels"] if "pack_int4_patches" in name]
    assert len(packs) == 2


def test_w4a4_conv_weights_are_packed_rows_of_the_window():
    _, weights, calls = _realized_w4a4(*_w4a4_conv_model())
    matmuls = [c for c in calls if c.args[0].name_hint.startswith("int4_matmul")]
    assert len(matmuls) == 2
    for call, w_int in zip(matmuls, weights, strict=True):
        rows = unpack_int4(call.args[1].fields[1].value.numpy())
        window = w_int[0].size
        assert rows.shape == (16, -(-window // 32) * 32)  # depth padded to whole MMA steps
        np.testing.assert_array_equal(rows[:, :window], w_int.reshape(16, window))
        assert not rows[:, window:].any()


@pytest.mark.parametrize(("strides", "padding", "dilation"), [
    ((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (1, 0, 1, 0), (1, 1)), ((1, 1), (2, 2, 2, 2), (2, 2))])
def test_patch_rows_pack_matches_numpy(strides, padding, dilation):
    # The run-time half of the s4 convolution, on the CPU: each output pixel's window, the
    # zero point outside the image, 0 past the window, packed two per byte.
    from tvm import te
    from tvmq.passes._int4 import patch_rows

    x = np.random.default_rng(5).integers(-8, 8, (2, 3, 7, 6)).astype(np.int8)
    zero, depth = -3, 32
    x_te = te.placeholder(x.shape, "int8", name="x")
    packed = pack_int4_te(patch_rows(x_te, kernel=(3, 3), strides=strides, padding=padding,
                                     dilation=dilation, zero=zero, depth=depth))
    lib = tvm.compile(te.create_prim_func([x_te, packed]), target="llvm")
    out = tvm.runtime.tensor(np.zeros([int(d) for d in packed.shape], np.int8))
    lib(tvm.runtime.tensor(x), out)
    top, left, bottom, right = padding
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=zero)
    (sh, sw), (dh, dw) = strides, dilation
    oh = (padded.shape[2] - dh * 2 - 1) // sh + 1
    ow = (padded.shape[3] - dw * 2 - 1) // sw + 1
    want = np.zeros((2 * oh * ow, depth), np.int8)
    for n, y, x_ in np.ndindex(2, oh, ow):
        patch = padded[n, :, y * sh : y * sh + 2 * dh + 1 : dh, x_ * sw : x_ * sw + 2 * dw + 1 : dw]
        want[(n * oh + y) * ow + x_, :27] = patch.reshape(-1)
    np.testing.assert_array_equal(unpack_int4(out.numpy()), want)


@pytest.mark.gpu
@needs_gpu
def test_w4a4_conv_numbers(tmp_path):
    # The s4 tensor-core convolutions compute the same integers as the CPU's W4A4 kernels.
    mod, calibration = _w4a4_conv_model()
    options = dict(quantize="int4", calibration_data=calibration,
                   qconfig=tvmq.QConfig(activation_bits=4))
    x = calibration[0]["x"]
    got = _run(tvmq.compile(mod, target="cuda-sm80", **options), tmp_path, x=x)
    (tmp_path / "cpu").mkdir()
    want = _run(tvmq.compile(mod, target="x86", **options), tmp_path / "cpu", x=x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
