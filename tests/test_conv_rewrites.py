"""ConvToGemm, ConvToWinograd and ChooseConvAlgorithm: structure, no-ops, idempotence,
numbers; plus folding and fusion of conv + batch norm + bias + activation."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R
from tvmq.passes._conv import read_conv2d
from tvmq.passes.conv_algorithm import ChooseConvAlgorithm, ConvAlgorithm, ConvPolicy, predict
from tvmq.passes.conv_to_gemm import ConvToGemm, gemm, im2col
from tvmq.passes.winograd import ConvToWinograd, transform_weight, winograd_compute

import tvmq
from tvmq.errors import ConfigError

RNG = np.random.default_rng(0)
W3 = RNG.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32)
W1 = RNG.normal(0, 0.2, (8, 4, 1, 1)).astype(np.float32)


def _conv_module(weight, strides=(1, 1), padding=(1, 1, 1, 1), groups=1, shape=(1, 4, 10, 10)):
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(weight), strides, padding, groups=groups), name_hint="conv")
            out = builder.emit_output(relax.op.nn.relu(conv))
        builder.emit_func_output(out)
    return builder.get()


def _expected(weight, emit_conv, shape=(1, 4, 10, 10)):
    """The module that the rewrite should produce, built the same way by hand."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(emit_conv(builder, x), name_hint="conv")
            out = builder.emit_output(relax.op.nn.relu(conv))
        builder.emit_func_output(out)
    return builder.get()


def _run(mod, x):
    preset = tvmq.targets.resolve("x86")
    with preset.tvm_target():
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset, tvmq.CompileConfig(
            conv_algorithm=ConvPolicy.DIRECT)))(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, preset.tvm_target(), relax_pipeline=None),
                              tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_winograd_structure():
    before = _conv_module(W3)
    expected = _expected(W3, lambda b, x: b.call_te(
        winograd_compute, x, relax.const(transform_weight(W3, 4)), (1, 1, 1, 1), 4, "float32",
        primfunc_name_hint="conv2d_winograd4"))
    tvm.ir.assert_structural_equal(ConvToWinograd(4)(before), expected)


def test_gemm_structure_pointwise_and_im2col():
    before = _conv_module(W1, padding=(0, 0, 0, 0))
    expected = _expected(W1, lambda b, x: b.call_te(
        gemm, relax.const(W1.reshape(8, 4)), x, "float32", primfunc_name_hint="conv2d_gemm"))
    tvm.ir.assert_structural_equal(ConvToGemm()(before), expected)

    before = _conv_module(W3, strides=(2, 2))
    expected = _expected(W3, lambda b, x: b.call_te(
        gemm, relax.const(W3.reshape(8, 36)),
        b.emit(b.call_te(im2col, x, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1),
                         primfunc_name_hint="im2col")),
        "float32", primfunc_name_hint="conv2d_gemm"))
    tvm.ir.assert_structural_equal(ConvToGemm()(before), expected)


@R.function
def _dynamic_weight(x: R.Tensor((1, 4, 10, 10), "float32"),
                    w: R.Tensor((8, 4, 3, 3), "float32")) -> R.Tensor((1, 8, 10, 10), "float32"):
    with R.dataflow():
        y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
        R.output(y)
    return y


@pytest.mark.parametrize(
    ("rewrite", "before"),
    [
        (ConvToWinograd(4), lambda: tvm.IRModule({"main": _dynamic_weight})),  # weight not const
        (ConvToWinograd(4), lambda: _conv_module(W3, strides=(2, 2))),  # strided
        (ConvToWinograd(2), lambda: _conv_module(W1, padding=(0, 0, 0, 0))),  # 1x1
        (ConvToGemm(), lambda: _conv_module(
            RNG.normal(size=(8, 1, 3, 3)).astype(np.float32), groups=4)),  # grouped
        (ConvToGemm(), lambda: tvm.IRModule({"main": _dynamic_weight})),
    ],
)
def test_no_match_leaves_module_unchanged(rewrite, before):
    mod = before()
    tvm.ir.assert_structural_equal(rewrite(mod), mod)


@pytest.mark.parametrize("rewrite", [ConvToWinograd(4), ConvToGemm()])
def test_idempotent(rewrite):
    once = rewrite(_conv_module(W3))
    tvm.ir.assert_structural_equal(rewrite(once), once)


@pytest.mark.parametrize(
    ("rewrite", "weight", "strides", "padding", "tolerance"),
    [
        (ConvToWinograd(2), W3, (1, 1), (1, 1, 1, 1), 1e-5),
        (ConvToWinograd(4), W3, (1, 1), (1, 1, 1, 1), 1e-4),
        (ConvToWinograd(4), W3, (1, 1), (0, 0, 0, 0), 1e-4),
        (ConvToGemm(), W3, (2, 2), (1, 1, 1, 1), 1e-5),
        (ConvToGemm(), W1, (1, 1), (0, 0, 0, 0), 1e-5),
        (ConvToGemm(), RNG.normal(0, 0.1, (8, 4, 7, 7)).astype(np.float32), (2, 2),
         (3, 3, 3, 3), 1e-5),
    ],
)
def test_rewrites_match_direct_numerically(rewrite, weight, strides, padding, tolerance):
    x = RNG.random((1, 4, 10, 10), dtype=np.float32)
    before = _conv_module(weight, strides, padding)
    expected = _run(before, x)
    actual = _run(rewrite(before), x)
    assert np.abs(actual - expected).max() / np.abs(expected).max() <= tolerance


@pytest.mark.parametrize(
    ("tile_size", "shape", "out_channels"),
    [
        (4, (2, 8, 13, 11), 16),     # batch 2, tiles past the image edge, uneven rows
        (4, (1, 16, 28, 28), 16),    # 7 x 7 tiles: rows padded to 8 tiles
        (2, (1, 32, 96, 96), 32),    # banded: a tile row at a time
        (4, (1, 32, 96, 96), 32),
    ],
)
def test_winograd_kernel_matches_direct(tile_size, shape, out_channels):
    weight = RNG.normal(0, 0.2, (out_channels, shape[1], 3, 3)).astype(np.float32)
    x = RNG.random(shape, dtype=np.float32)
    before = _conv_module(weight, shape=shape)
    expected = _run(before, x)
    actual = _run(ConvToWinograd(tile_size)(before), x)
    assert np.abs(actual - expected).max() / np.abs(expected).max() <= 1e-4


@pytest.mark.parametrize(("shape", "out_channels", "banded"), [
    ((1, 32, 96, 96), 32, True),
    ((1, 64, 224, 224), 64, True),
    ((1, 64, 56, 56), 64, True),
    ((1, 256, 56, 56), 256, False),   # the 9.4 MB weight streamed per band: unbanded
    ((1, 128, 28, 28), 128, False),   # fits in cache whole
])
def test_winograd_schedule_bands_big_images(shape, out_channels, banded):
    from tvm import te
    from tvmq.schedules.cpu_winograd import WinogradConv

    data = te.placeholder(shape, "float32", name="data")
    weight = te.placeholder((6, 6, shape[1], out_channels), "float32", name="weight")
    out = winograd_compute(data, weight, (1, 1, 1, 1), 4, "float32")
    target = tvmq.targets.resolve("x86-avx512").tvm_target()
    sch = WinogradConv().apply(te.create_prim_func([data, weight, out]), target, False)
    # Banded: data_pack runs under the parallel band loop that the GEMM shares.
    pack, gemm = (sch.get(sch.get_loops(sch.get_sblock(name))[0])
                  for name in ("data_pack", "bgemm_update"))
    assert (pack.kind == tvm.tirx.ForKind.PARALLEL and pack.same_as(gemm)) == banded


def _algorithms(mod):
    return {r["node"]: r["algorithm"] for r in __import__("json").loads(
        str(mod.attrs["tvmq.conv_algorithms"]))}


def test_predict_policy_and_overrides():
    def predicted(mod):
        return list(_algorithms(ChooseConvAlgorithm(ConvPolicy.PREDICT)(mod)).values())

    assert predicted(_conv_module(W3, strides=(2, 2), shape=(1, 4, 32, 32))) == ["gemm"]
    assert predicted(_conv_module(W3, strides=(2, 2))) == ["direct"]  # 5 wide: not worth it
    assert predicted(_conv_module(W1, padding=(0, 0, 0, 0), shape=(1, 4, 16, 16))) == ["gemm"]
    plain = _conv_module(W3)
    assert list(_algorithms(ChooseConvAlgorithm(ConvPolicy.PREDICT)(plain)).values()) == [
        "direct"]
    forced = ChooseConvAlgorithm(ConvPolicy.PREDICT, overrides={"con*": "winograd2"})(plain)
    assert list(_algorithms(forced).values()) == ["winograd2"]
    assert "conv2d_winograd2" in [g.name_hint for g in forced.get_global_vars()]


def test_measure_policy_takes_the_fastest():
    timings = {ConvAlgorithm.DIRECT: 3.0, ConvAlgorithm.GEMM: 2.0,
               ConvAlgorithm.WINOGRAD2: 1.5, ConvAlgorithm.WINOGRAD4: 1.0}
    chosen = ChooseConvAlgorithm(ConvPolicy.MEASURE, measure=lambda conv, a: timings[a])(
        _conv_module(W3))
    record = __import__("json").loads(str(chosen.attrs["tvmq.conv_algorithms"]))[0]
    assert record["algorithm"] == "winograd4"
    assert record["measured_ms"] == {"direct": 3.0, "gemm": 2.0, "winograd2": 1.5,
                                     "winograd4": 1.0}


def test_impossible_override_is_an_error():
    with pytest.raises(ConfigError, match=r"node 'conv' cannot use winograd4; it can use direct"):
        ChooseConvAlgorithm(overrides={"conv": "winograd4"})(_conv_module(W3, strides=(2, 2)))


def test_measured_choice_recorded_in_manifest(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.setenv("TVMQ_CACHE_DIR", str(tmp_path))
    artifact = tvmq.compile(tiny_model_path, conv_algorithm="measure")
    (record,) = artifact.manifest["conv_algorithms"]
    assert set(record["measured_ms"]) == {"direct", "gemm", "winograd2", "winograd4"}
    assert record["algorithm"] == min(record["measured_ms"], key=record["measured_ms"].get)
    assert (tmp_path / "conv_algorithms-v4.json").exists()


def test_fold_and_fuse_conv_bn_bias_relu_into_one_kernel(tiny_model_path):
    kernels = tvmq.compile(tiny_model_path).manifest["kernels"]
    (conv,) = [name for name in kernels if "conv2d" in name]
    assert "relu" in conv and "add" in conv
    assert not any("batch_norm" in name for name in kernels)


def test_read_conv2d_ignores_integer_convs():
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 10, 10), "int8"))
    with builder.function("main", [x]):
        call = relax.op.nn.conv2d(x, relax.const(np.ones((8, 4, 3, 3), np.int8)),
                                  out_dtype="int32")
        out = builder.emit(call)
        builder.emit_func_output(out)
    assert read_conv2d(builder.get()["main"].body.blocks[0].bindings[0].value) is None


@pytest.mark.parametrize("in_channels, out_channels, size, want", [
    (256, 256, 56, "winograd4"),   # VGG-19: 11.3 ms against 17.5 direct
    (512, 512, 28, "winograd4"),
    (128, 128, 28, "winograd4"),   # ResNet-50: 0.93 against 1.29
    (64, 64, 56, "winograd4"),     # ResNet-50: 0.80 against 1.18
    (256, 256, 14, "direct"),      # too narrow: 4x the weight bytes, cold in a model
    (512, 512, 7, "direct"),
    (3, 64, 224, "direct"),        # too few input channels
])
def test_predict_takes_winograd_for_big_3x3_layers(in_channels, out_channels, size, want):
    x = relax.Var("x", relax.TensorType((1, in_channels, size, size), "float32"))
    w = np.zeros((out_channels, in_channels, 3, 3), np.float32)
    conv = read_conv2d(relax.op.nn.conv2d(x, relax.const(w), (1, 1), (1, 1, 1, 1)))
    assert predict(conv, weight_block=32) == want
    assert predict(conv, weight_block=None) != "winograd4"   # GPUs: no CPU Winograd schedule
