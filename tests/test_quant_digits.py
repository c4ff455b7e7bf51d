"""INT8 on the bundled digits CNN: accuracy against FP32 and ONNX Runtime's quantize_static,
the per-layer report, pre-quantized ONNX QDQ models, and the CLI."""

import json
import os
from importlib import resources

import numpy as np
import pytest

import tvmq
from tvmq.cli import main as cli_main
from tvmq.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

EXAMPLES = resources.files("tvmq") / "examples"
MODEL = str(EXAMPLES / "digits.onnx")
CALIB = str(EXAMPLES / "digits_calib.npz")


@pytest.fixture(scope="module")
def held_out():
    with np.load(str(EXAMPLES / "digits_data.npz")) as data:
        return (data["test_x_u8"].astype(np.float32) / 255.0), data["test_y"]


def _accuracy(predict, images, labels) -> float:
    hits = sum(int(predict(images[i : i + 1]).argmax() == labels[i]) for i in range(len(labels)))
    return 100.0 * hits / len(labels)


def _tvmq_accuracy(artifact, tmp_path, name, images, labels) -> float:
    path = tmp_path / f"{name}.tar"
    artifact.export(path)
    model = tvmq.runtime.load(path)
    return _accuracy(lambda x: model.run(input=x)["logits"], images, labels)


@pytest.fixture(scope="module")
def ort_int8_model(tmp_path_factory):
    calib = np.load(CALIB)["input"]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"input": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.feeds, None)

    path = str(tmp_path_factory.mktemp("ort") / "digits_qdq.onnx")
    quantization.quantize_static(
        MODEL, path, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
    )
    return path


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    report = tmp_path_factory.mktemp("report") / "report.json"
    artifact = tvmq.compile(MODEL, quantize="int8", calibration_data=CALIB,
                            quantize_report=report)
    return artifact, json.loads(report.read_text())


def test_int8_accuracy_against_fp32_and_onnxruntime(int8_build, ort_int8_model, held_out,
                                                    tmp_path):
    images, labels = held_out
    fp32 = _tvmq_accuracy(tvmq.compile(MODEL), tmp_path, "fp32", images, labels)
    int8 = _tvmq_accuracy(int8_build[0], tmp_path, "int8", images, labels)
    session = ort.InferenceSession(ort_int8_model, providers=["CPUExecutionProvider"])
    ort_int8 = _accuracy(lambda x: session.run(None, {"input": x})[0], images, labels)
    print(f"top-1 on {len(labels)} held-out digits: FP32 {fp32:.1f}%  tvmq INT8 {int8:.1f}%  "
          f"ORT quantize_static INT8 {ort_int8:.1f}%")
    assert int8 >= fp32 - 0.3
    assert int8 >= ort_int8


def test_report_lists_every_layer_and_the_manifest_keeps_a_summary(int8_build):
    artifact, report = int8_build
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert {"conv2d_0", "conv2d_4", "add_0", "max_pool2d_0", "mean_0", "matmul_0"} <= set(layers)
    conv = layers["conv2d_0"]
    assert conv["fused"] == ["bias", "nn.relu"]
    assert conv["weight_bits"] == 8 and len(conv["weight_scales"]) == 16
    assert conv["input_zero_points"] == [-128] and conv["output_scale"] > 0
    assert all(layer["sqnr_db"] is None or layer["sqnr_db"] > 20 for layer in layers.values())
    assert report["calibration"]["method"] == "minmax"
    assert report["realized"].count("nn.conv2d") == 5
    summary = artifact.manifest["quantization"]
    assert summary["mode"] == "int8" and summary["layers"][0]["name"] == "conv2d_0"
    assert "float_ops" in summary


def test_onnx_qdq_model_realizes_integer_only(ort_int8_model, held_out, tmp_path):
    images, labels = held_out
    images, labels = images[:300], labels[:300]
    realized = tvmq.QuantizationReport.from_module(_realized_module(ort_int8_model)).realized
    assert realized.count("nn.conv2d") == 5 and "matmul" in realized
    artifact = tvmq.compile(ort_int8_model)
    path = tmp_path / "qdq.tar"
    artifact.export(path)
    ours = tvmq.runtime.load(path)
    # ORT without graph optimizations runs the QDQ graph as written: the reference semantics
    # (its fused QLinear kernels, on by default, round differently).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ort_int8_model, options, providers=["CPUExecutionProvider"])
    step = _output_step(ort_int8_model)
    worst = max(
        float(np.abs(ours.run(input=images[i : i + 1])["logits"]
                     - session.run(None, {"input": images[i : i + 1]})[0]).max())
        for i in range(len(labels))
    )
    assert worst <= step * 1.0001


def _output_step(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.output[0] == "logits")
    return float(inits[node.input[1]])


def _realized_module(path):
    import tvm

    passes = tvmq.pipeline("x86")
    names = [p.info.name for p in passes]
    return tvm.transform.Sequential(passes[: names.index("RealizeQuantization") + 1])(
        tvmq.load(path)
    )


def test_int8_needs_calibration_data():
    with pytest.raises(ConfigError, match=r"--quantize int8 needs calibration data; pass "
                                          r"--calibration-data"):
        tvmq.pipeline("x86", tvmq.CompileConfig(quantize="int8"))


def test_cli_quantize_report(tmp_path, capsys):
    report = tmp_path / "report.json"
    out = tmp_path / "digits_int8.tar"
    code = cli_main(["compile", MODEL, "--quantize", "int8", "--calibration-data", CALIB,
                     "--quantize-report", str(report), "-o", str(out)])
    assert code == 0 and os.path.isfile(out)
    assert json.loads(report.read_text())["layers"][0]["name"] == "conv2d_0"
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 1, 28, 28), np.float32))
    code = cli_main(["compile", MODEL, "--quantize", "int8", "--calibration-data", str(bad),
                     "-o", str(out)])
    assert code == 1
    assert "has an array 'images' but the model's inputs are: input" in capsys.readouterr().err


def test_vnni_target_realizes_uint8_activations():
    """x86-vnni gets u8 activations (VNNI's u8 x s8), other targets s8; the +128 shift's
    compensation is in the bias, so both compute the same integers (tested bit-exact in
    test_quant_realize)."""
    from tvmq.build import run_passes
    from tvmq.config import CompileConfig
    from tvmq.examples import DIGITS_CALIBRATION, DIGITS_MODEL
    from tvmq.pipeline import pass_name

    texts = {}
    for target in ("x86-vnni", "x86-avx2"):
        preset = tvmq.targets.resolve(target)
        config = CompileConfig(quantize="int8", calibration_data=DIGITS_CALIBRATION)
        passes = tvmq.pipeline(preset, config)
        upto = [pass_name(p) for p in passes].index("RealizeQuantization") + 1
        with preset.tvm_target():
            texts[target] = run_passes(tvmq.load(DIGITS_MODEL), passes[:upto]).script()
    assert '"uint8"' in texts["x86-vnni"]
    assert '"uint8"' not in texts["x86-avx2"] and '"int8"' in texts["x86-avx2"]


def test_int8_kernels_report_their_operations(int8_build):
    """Tensorized int8 kernels are opaque to TVM's estimate: their counts are taken before
    scheduling (RecordKernelOps), so the profiler's GOP/s is not 0 for them."""
    kernels = int8_build[0].manifest["kernels"]
    convs = {name: k for name, k in kernels.items() if "conv2d" in name}
    assert convs and all(k["ops"] > 0 for k in convs.values()), convs
