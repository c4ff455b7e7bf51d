"""4-bit activations (W4A4 / W8A4): every integer kernel really reads 16 levels, also on
inputs far outside the calibration range; points shared with 8-bit readers or tied behind a
max-pool get consistent bits; the report, bit-operations and the CLI say so; the digits CNN
keeps its accuracy at W4A4."""

import json
from importlib import resources

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmq.passes import AnnotateQuantization, Calibrate, RealizeQuantization
from tvmq.passes._observe import build
from tvmq.passes._qdq import BITS_ATTR, read_json_attr
from tvmq.passes.bit_allocation import Budget
from tvmq.passes.select_bits import SelectBits

import tvmq
from tvmq.cli import main as cli_main
from tvmq.qconfig import LayerOverride, QConfig

RNG = np.random.default_rng(11)
EXAMPLES = resources.files("tvmq") / "examples"


def _model():
    """conv + relu -> max-pool -> conv + relu (read also by a second conv) -> add -> dense;
    the same weights on every call (the tests compare builds of it)."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.4, (8, 2, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.2, (8, 8, 1, 1)).astype(np.float32)
    w4 = rng.normal(0, 0.3, (8, 4)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w1), padding=[1] * 4)))
            p = bb.emit(relax.op.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2]))
            z = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(p, relax.const(w2), padding=[1] * 4)))
            a = bb.emit(relax.op.nn.conv2d(z, relax.const(w3)))
            s = bb.emit(relax.op.add(z, a))
            m = bb.emit(relax.op.mean(s, axis=[2, 3]))
            out = bb.emit_output(relax.op.matmul(m, relax.const(w4)))
        bb.emit_func_output(out)
    return relax.transform.FoldConstant()(bb.get())


DATA = [{"x": RNG.random((1, 2, 8, 8), dtype=np.float32)} for _ in range(8)]


def _quantized(qconfig, unsigned=False):
    annotated = AnnotateQuantization(qconfig)(_model())
    calibrated = Calibrate(DATA, qconfig.calibration, report_batches=2)(annotated)
    return calibrated, RealizeQuantization(unsigned_activations=unsigned)(calibrated)


def _report(mod):
    return {layer["name"]: layer for layer in tvmq.QuantizationReport.from_module(mod).layers}


def _kernel_inputs(mod):
    """``main`` returning, besides its output, the integer activation read by each integer
    conv2d / matmul, int8 or int4 weights (in order)."""
    flat = relax.transform.ToNonDataflow()(mod)["main"]
    reads = []
    for block in flat.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name in ("relax.nn.conv2d", "relax.matmul")
                    and str(value.attrs.out_dtype) == "int32"
                    and str(value.args[0].ty.dtype) in ("int8", "uint8")):
                reads.append(value.args[0])
            elif (isinstance(value, relax.Call) and getattr(value.op, "name", "") ==
                  "relax.call_tir" and "int4" in value.args[0].name_hint):
                reads.append(value.args[1].fields[0])  # an int4-weight kernel's input
    fields = [flat.body.body, *reads]
    body = relax.SeqExpr(flat.body.blocks, relax.Tuple(fields))
    func = relax.Function(flat.params, body, relax.TupleType([f.ty for f in fields]), True,
                          flat.attrs)
    return relax.transform.Normalize()(tvm.IRModule({"main": func}))["main"], len(reads)


@pytest.mark.parametrize("unsigned", [False, True])
def test_every_integer_kernel_reads_16_levels_even_out_of_range(unsigned):
    _, realized = _quantized(QConfig(activation_bits=4), unsigned)
    func, count = _kernel_inputs(realized)
    assert count == 4  # three convs and the dense
    vm = build(func)
    lo, hi = (120, 135) if unsigned else (-8, 7)
    seen = [set() for _ in range(count)]
    for scale in (1.0, 6.0, -3.0):  # far outside the calibration range too
        x = (scale * RNG.random((1, 2, 8, 8))).astype(np.float32)
        result = vm["main"](tvm.runtime.tensor(x))
        for i in range(count):
            values = result[i + 1].numpy()
            assert values.min() >= lo and values.max() <= hi, (i, values.min(), values.max())
            seen[i] |= set(np.unique(values).tolist())
    assert all(len(s) > 4 for s in seen)  # the 16 levels are used, not a constant


def test_w8a4_realized_matches_its_simulated_model():
    calibrated, realized = _quantized(QConfig(activation_bits=4))
    x = RNG.random((1, 2, 8, 8), dtype=np.float32)
    simulated = build(calibrated["main"], calibrated)["main"](tvm.runtime.tensor(x)).numpy()
    got = build(realized["main"], realized)["main"](tvm.runtime.tensor(x)).numpy()
    float_out = build(_model()["main"])["main"](tvm.runtime.tensor(x)).numpy()
    # Integer rounding may move a level here and there; the 4-bit error itself is larger.
    assert np.abs(got - simulated).max() < 0.25 * np.abs(simulated - float_out).max() + 1e-3


def test_override_tie_and_shared_reader_bits():
    # conv2d_1 reads the max-pool output: asking for 4 bits makes the pool's input (tied to
    # one scale) 4-bit too. conv2d_2 asks for 4 bits, but its input is also read by the
    # 8-bit add: it stays 8-bit, and the report says why.
    qconfig = QConfig(overrides={"conv2d_1": LayerOverride(activation_bits=4),
                                 "conv2d_2": LayerOverride(activation_bits=4)})
    annotated = AnnotateQuantization(qconfig)(_model())
    report = _report(annotated)
    assert report["conv2d_0"]["activation_bits"] == 8
    assert report["max_pool2d_0"]["activation_bits"] == 4
    assert report["conv2d_1"]["activation_bits"] == 4
    assert report["conv2d_2"]["activation_bits"] == 8
    assert "asked for 4" in report["conv2d_2"]["activation_bits_note"]
    assert "activation_bits_note" not in report["conv2d_1"]
    # Bit-operations count the bits read: conv2d_1 8 x 4, conv2d_0 8 x 8.
    assert report["conv2d_1"]["bops"] == report["conv2d_1"]["macs"] * 8 * 4
    assert report["conv2d_0"]["bops"] == report["conv2d_0"]["macs"] * 8 * 8
    clips = [v for v in relax.analysis.get_var2val(annotated["main"]).values()
             if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.clip"]
    assert len(clips) == 2  # the pool's input and its output: one scale, 16 levels


def test_activation_bits_must_be_8_or_4():
    with pytest.raises(tvmq.errors.ConfigError, match=r"activation_bits=2 is not supported"):
        LayerOverride(activation_bits=2)


@pytest.fixture(scope="module")
def digits():
    with np.load(str(EXAMPLES / "digits_data.npz")) as data:
        return data["test_x_u8"].astype(np.float32) / 255.0, data["test_y"]


def _accuracy(path, images, labels):
    model = tvmq.runtime.load(path)
    hits = [int(model.run(input=images[i:i + 1])["logits"].argmax() == labels[i])
            for i in range(len(labels))]
    return 100.0 * np.mean(hits)


def test_digits_w4a4_from_the_cli(tmp_path, digits, capsys):
    model, calib = str(EXAMPLES / "digits.onnx"), str(EXAMPLES / "digits_calib.npz")
    out, report = tmp_path / "w4a4.tar", tmp_path / "w4a4.json"
    assert cli_main(["compile", model, "--quantize", "int4", "--activation-bits", "4",
                     "--calibration-method", "mse", "--calibration-data", calib,
                     "-o", str(out), "--quantize-report", str(report)]) == 0


    layers = json.loads(report.read_text())["layers"]
    assert {(layer.get("weight_bits"), layer["activation_bits"]) for layer in layers
            if layer.get("weight_bits")} == {(4, 4)}
    fp32 = tmp_path / "fp32.tar"
    tvmq.compile(model).export(fp32)
    images, labels = digits
    # Measured here: FP32 98.3, W4A4 (mse) 97.7, W4A4 (minmax) 96.7, W8A8 98.4.
    assert _accuracy(out, images, labels) >= _accuracy(fp32, images, labels) - 1.5
    assert cli_main(["compile", model, "--activation-bits", "4", "-o", str(out)]) == 1
    assert "--activation-bits is only used with --quantize" in capsys.readouterr().err


def test_bops_budget_chooses_activation_bits_per_tensor():
    # Weights alone reach 0.5 of the INT8 bit-operations at best; 0.4 needs 4-bit tensors.
    mod = SelectBits(DATA, Budget.parse("bops", "0.4"))(_model())
    chosen = read_json_attr(mod["main"], BITS_ATTR, {})
    choosing = {name for name, c in chosen.items() if "activation_bits" in c}
    # conv2d_2's input is also read by the add, which asks for 8 bits: not the solver's.
    assert choosing == {"conv2d_0", "conv2d_1", "matmul_0"}
    assert all(chosen[n]["activation_sensitivity"]["4"] > 0 for n in choosing)
    annotated = AnnotateQuantization(QConfig())(mod)
    report = _report(annotated)
    for name in choosing:
        assert report[name]["activation_bits"] == chosen[name]["activation_bits"]
    # The max-pool's input and output share one scale, so one width.
    assert report["max_pool2d_0"]["activation_bits"] == report["conv2d_1"]["activation_bits"]
    bops = sum(report[name]["bops"] for name in chosen)
    assert bops <= 0.4 * sum(report[name]["macs"] * 64 for name in chosen)
    narrow = [i for i, name in enumerate(["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"])
              if report[name]["activation_bits"] == 4]
    assert narrow
    # The realized kernels of the 4-bit readers read 16 levels.
    calibrated = Calibrate(DATA, report_batches=0)(annotated)
    realized = RealizeQuantization()(calibrated)
    func, count = _kernel_inputs(realized)
    assert count == 4
    vm = build(func, realized)
    for scale in (1.0, 6.0):
        result = vm["main"](tvm.runtime.tensor((scale * RNG.random((1, 2, 8, 8))).astype(
            np.float32)))
        for i in narrow:
            values = result[i + 1].numpy()
            assert values.min() >= -8 and values.max() <= 7, (i, values.min(), values.max())


def test_activation_override_is_not_the_solvers():
    qconfig = QConfig(overrides={"conv2d_0": LayerOverride(activation_bits=8)})
    mod = SelectBits(DATA, Budget.parse("bops", "0.45"), qconfig)(_model())
    chosen = read_json_attr(mod["main"], BITS_ATTR, {})
    assert "activation_bits" not in chosen["conv2d_0"]
    assert _report(AnnotateQuantization(qconfig)(mod))["conv2d_0"]["activation_bits"] == 8
