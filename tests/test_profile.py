"""tvmq profile: per-kernel table, formats, the HTML report and baseline pairing."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from test_cli import tvmq_cli
from tvm.script import ir as I
from tvm.script import relax as R

import tvmq
from tvmq.examples import DIGITS_MODEL, digits_test_set
from tvmq.profiler import KernelRow, Profile, profile
from tvmq.report import pair_layers


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profile") / "digits.tar"
    tvmq.compile(DIGITS_MODEL, target="x86").export(path)
    return str(path)


@pytest.fixture(scope="module")
def digits_profile(digits_artifact) -> Profile:
    images, _ = digits_test_set()
    # Many runs: the sum is compared with means of sub-millisecond runs on a shared VM.
    return profile(digits_artifact, inputs={"input": images[:1]}, repeat=150)


def test_every_kernel_listed_and_mapped_to_onnx_nodes(digits_artifact, digits_profile):
    model = tvmq.runtime.load(digits_artifact)
    called = set()
    model.vm.set_instrument(
        lambda f, sym, before, ret, *a: called.add(str(sym)) if before else None
    )
    model.run(input=np.zeros((1, 1, 28, 28), np.float32))
    kernels = {s for s in called if not s.startswith("vm.")}
    rows = [r for r in digits_profile.rows if r.algorithm != "runtime"]
    assert {r.name for r in rows} == kernels
    (runtime,) = [r for r in digits_profile.rows if r.algorithm == "runtime"]
    assert runtime.calls > 0 and runtime.time_ms >= 0
    for row in rows:
        assert row.nodes, f"kernel {row.name} maps to no ONNX node"
    nodes = {n for r in digits_profile.rows for n in r.nodes}
    assert {"/pool1/MaxPool", "/pool2/MaxPool", "/gap/GlobalAveragePool"} <= nodes
    conv_rows = [r for r in digits_profile.rows if "conv2d" in r.name]
    assert len(conv_rows) == 5
    assert all(r.algorithm == "direct" and r.precision == "fp32" for r in conv_rows)
    assert all(r.ops > 0 and r.bytes > 0 and r.throughput_gops > 0 for r in conv_rows)


def test_kernels_sum_close_to_end_to_end(digits_profile):
    # Above the end-to-end time: kernels timed slower than they run. Far below it: calls went
    # untimed (the digits model's VM work outside kernels is ~15% of a 50 us run).
    assert digits_profile.kernels_ms > 0
    assert -0.5 <= digits_profile.difference <= 0.15, digits_profile.to_table()
    (runtime,) = [r for r in digits_profile.rows if r.algorithm == "runtime"]
    kernels = sum(r.time_ms for r in digits_profile.rows if r.algorithm != "runtime")
    assert runtime.time_ms == pytest.approx(
        max(0.0, digits_profile.end_to_end_ms - kernels), abs=1e-9)


def test_json_and_csv_parse(digits_profile, digits_artifact, tmp_path):
    tvmq_cli("profile", digits_artifact, "--repeat", "3", "--format", "json",
             "-o", str(tmp_path / "p.json"))
    data = json.loads((tmp_path / "p.json").read_text())
    assert {"rows", "end_to_end_ms", "kernels_ms", "difference", "peak_gops"} <= set(data)
    kernels = [r for r in data["rows"] if r["algorithm"] != "runtime"]
    assert kernels[0]["time_ms"] >= kernels[-1]["time_ms"]
    assert data["rows"][-1]["algorithm"] == "runtime"
    rows = list(csv.DictReader(io.StringIO(digits_profile.to_csv())))
    assert len(rows) == len(digits_profile.rows)
    assert float(rows[0]["time_ms"]) > 0 and rows[0]["nodes"]


def _row(name: str, ms: float, *nodes: str) -> KernelRow:
    return KernelRow(name, 1, ms, 0.0, 0, 0, 0.0, 0.0, nodes, "fp32", "-")


def test_baseline_pairs_layers_by_shared_nodes():
    fp32 = Profile("fp32.tar", "x86", (
        _row("fused_conv_bn_relu", 2.0, "conv1", "bn1", "relu1"),
        _row("pool", 0.5, "pool1"),
        _row("fused_matmul_add", 1.0, "fc"),
    ), 3.6, 3.5)
    int8 = Profile("int8.tar", "x86", (
        _row("quantize_input", 0.1, "conv1"),
        _row("fused_qconv_requant_relu", 0.8, "conv1", "relu1"),
        _row("pool_int8", 0.4, "pool1"),
        _row("fused_qmatmul", 0.5, "fc"),
    ), 1.9, 1.8)
    pairs = {p.nodes[0]: p for p in pair_layers(int8, fp32)}
    assert set(pairs) == {"conv1", "pool1", "fc"}
    conv = pairs["conv1"]
    assert set(conv.kernels) == {"quantize_input", "fused_qconv_requant_relu"}
    assert conv.baseline_kernels == ("fused_conv_bn_relu",)
    assert conv.time_ms == pytest.approx(0.9) and conv.speedup == pytest.approx(2.0 / 0.9)
    assert pairs["fc"].speedup == pytest.approx(2.0)


def test_cli_baseline_table(digits_artifact, tmp_path):
    other = tmp_path / "unfolded.tar"
    tvmq.compile(DIGITS_MODEL, target="x86",
                 disabled_passes=["FoldBatchnormToConv2D"]).export(other)
    out = tvmq_cli("profile", digits_artifact, "--repeat", "3", "--baseline", str(other)).stdout
    assert "vs baseline" in out and "/pool1/MaxPool" in out and "speedup" in out


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (make setup-system)")
def test_html_renders_in_headless_chromium(digits_artifact, tmp_path):
    report = tmp_path / "report.html"
    images, labels = digits_test_set()
    np.savez(tmp_path / "eval.npz", input=images[:50], labels=labels[:50])
    tvmq_cli("profile", digits_artifact, "--repeat", "3", "--format", "html",
             "-o", str(report), "--baseline", digits_artifact,
             "--eval-data", str(tmp_path / "eval.npz"))
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2 and "<table id='kernels'>" in text
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
         f"--screenshot={shot}", "--window-size=1200,1600", f"file://{report}"],
        check=True, capture_output=True, timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] >= 1000
    # A rendered report has text, table borders and a coloured bar chart, not a blank page.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (np.abs(pixels[..., 2].astype(int) - pixels[..., 0]) > 60).any()


@tvm.register_global_func("tvmq.test.profile_double")
def _double(x, out):
    out.copyfrom(x.numpy() * 2)


@I.ir_module
class _Packed:
    @R.function
    def main(x: R.Tensor((4, 4), "float32")) -> R.Tensor((4, 4), "float32"):
        with R.dataflow():
            y = R.call_dps_packed("tvmq.test.profile_double", (x,),
                                  out_ty=R.Tensor((4, 4), "float32"))
            R.output(y)
        return y


def test_a_packed_call_outside_the_library_is_timed(tmp_path):
    # Not in the artifact's library: timed by calls from Python instead of TVM's evaluator.
    path = tvmq.compile(_Packed, target="x86").export(tmp_path / "packed.tar")
    result = profile(path, repeat=5)
    (row,) = [r for r in result.rows if r.name == "tvmq.test.profile_double"]
    assert row.calls == 1 and row.time_ms > 0


@pytest.mark.parametrize("name, algorithm", [
    ("fused_conv2d_pointwise3_add1", "gemm"),     # ConvToGemm's 1x1 kernel
    ("fused_conv2d_gemm2_add4", "gemm"),
    ("fused_conv2d_blocked5_add2_maximum1", "direct"),
    ("fused_conv2d_depthwise1_add3", "direct"),
    ("fused_conv2d_winograd1_add2", "winograd"),
])
def test_kernel_algorithm_from_its_name(name, algorithm):
    from tvmq.kernels import _algorithm

    func = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0))
    assert _algorithm(name, func) == algorithm


def test_cold_profile_flushes_before_each_kernel(digits_profile, digits_artifact, tmp_path):
    tvmq_cli("profile", digits_artifact, "--repeat", "3", "--cold", "--format", "json",
             "-o", str(tmp_path / "cold.json"))
    data = json.loads((tmp_path / "cold.json").read_text())
    assert data["cold"] is True and digits_profile.cold is False
    names = {r["name"] for r in data["rows"]}
    assert names == {r.name for r in digits_profile.rows}
    # Every call waits for its weights and inputs from memory: the sum cannot come in
    # under the warm one (on the digits model it is several times it).
    assert data["kernels_ms"] > digits_profile.kernels_ms
    table = tvmq.profiler.profile(digits_artifact, repeat=3, cold=True).to_table()
    assert "kernels timed cold" in table.splitlines()[0]
