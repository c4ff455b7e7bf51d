"""aarch64 artifacts run under qemu-aarch64 here, and their numbers match the x86 build.

The first run downloads the aarch64 TVM runtime wheels from PyPI into the tvmq cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import conv_relu_model, relative_error
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import tvmq
import tvmq.emulate as emulate
from tvmq.config import BUILT_QUANTIZE_MODES, QuantizeMode
from tvmq.errors import ArtifactError, ConfigError
from tvmq.examples import DIGITS_CALIBRATION, DIGITS_MODEL, digits_test_set

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs Debian's qemu-user and g++-aarch64-linux-gnu (make setup-system)",
)


def tvmq_cli(*args: str, check: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "tvmq", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == check, result.stderr
    return result


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    test_images, _ = digits_test_set()
    return [test_images[i : i + 1] for i in (0, 1)]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile the digits CNN once per (target, quantize) and return the artifact path."""
    folder = tmp_path_factory.mktemp("emulate")
    built = {}

    def _build(target: str, quantize: str = "none") -> str:
        if (target, quantize) not in built:
            calibration = DIGITS_CALIBRATION if quantize != "none" else None
            artifact = tvmq.compile(
                DIGITS_MODEL, target=target, quantize=quantize, calibration_data=calibration
            )
            built[target, quantize] = artifact.export(folder / f"{target}-{quantize}.tar")
        return built[target, quantize]

    return _build


def _assert_matches_x86(build, images, target: str, quantize: str = "none") -> None:
    x86 = tvmq.runtime.load(build("x86", quantize))
    arm = emulate.load_emulated(build(target, quantize))
    for image in images:
        expected = x86.run(input=image)
        actual = arm.run(input=image)
        assert list(actual) == list(expected) == ["logits"]
        assert actual["logits"].dtype == np.float32
        assert relative_error(actual["logits"], expected["logits"]) <= 1e-5


@pytest.mark.parametrize("target", ["aarch64", "aarch64-dotprod"])
def test_float_aarch64_matches_x86(build, images, target):
    _assert_matches_x86(build, images, target)


@pytest.mark.skipif(QuantizeMode.INT8 not in BUILT_QUANTIZE_MODES,
                    reason="--quantize int8 is not built in this version of tvmq")
def test_int8_aarch64_dotprod_matches_int8_x86(build, images):
    _assert_matches_x86(build, images, "aarch64-dotprod", "int8")


def test_winograd_aarch64_matches_x86(tmp_path):
    # 32 channels at 96x96: a Winograd F(4x4) kernel that runs band by band, on NEON lanes.
    path = str(tmp_path / "winograd.onnx")
    onnx.save(conv_relu_model(32, 96), path)
    outputs = {}
    for target in ("x86", "aarch64"):
        artifact = tvmq.compile(path, target=target)
        assert [k["algorithm"] for k in artifact.manifest["kernels"].values()] == ["winograd"]
        outputs[target] = artifact.export(tmp_path / f"{target}.tar")
    x = np.random.default_rng(3).random((1, 32, 96, 96), dtype=np.float32)
    expected = tvmq.runtime.load(outputs["x86"]).run(x=x)["y"]
    actual = emulate.run_emulated(outputs["aarch64"], {"x": x})["y"]
    assert relative_error(actual, expected) <= 1e-5


def test_run_emulated_takes_a_dict(build, images):
    outputs = emulate.run_emulated(build("aarch64"), {"input": images[0]})
    assert outputs["logits"].shape == (1, 10)


def test_x86_artifact_is_refused(tiny_artifact):
    with pytest.raises(ArtifactError, match=r"built for x86_64.*emulation runs aarch64 artifacts"):
        emulate.run_emulated(tiny_artifact, {"x": np.zeros((1, 1, 8, 8), np.float32)})


def test_unknown_cpu_is_refused(build):
    with pytest.raises(ConfigError, match=r"'pentium' is not a qemu-aarch64 CPU model.*cortex-a53"):
        emulate.load_emulated(build("aarch64"), cpu="pentium")


def test_missing_qemu_names_the_fix(build, monkeypatch):
    path = build("aarch64")
    monkeypatch.setattr(emulate.shutil, "which", lambda tool: None)
    with pytest.raises(ArtifactError, match=r"qemu-aarch64 is not installed.*make setup-system"):
        emulate.load_emulated(path)


def test_failed_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMQ_CACHE_DIR", str(tmp_path))

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(emulate.subprocess, "run", offline)
    with pytest.raises(ArtifactError, match=r"could not download the aarch64 TVM runtime.*network"):
        emulate.runtime_dir()


# One sdot: c[i] = sum over k of a[4i + k] * b[4i + k], for i in 0..3.
@I.ir_module
class _Sdot:
    @T.prim_func
    def sdot(a: T.Buffer((16,), "int8"), b: T.Buffer((16,), "int8"), c: T.Buffer((4,), "int32")):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        c[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
            "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8",
            T.broadcast(T.int32(0), 4), a[T.ramp(0, 1, 16)], b[T.ramp(0, 1, 16)],
        )

    @R.function
    def main(a: R.Tensor((16,), "int8"), b: R.Tensor((16,), "int8")) -> R.Tensor((4,), "int32"):
        cls = _Sdot
        with R.dataflow():
            c = R.call_tir(cls.sdot, (a, b), out_ty=R.Tensor((4,), "int32"))
            R.output(c)
        return c


@pytest.fixture(scope="module")
def sdot_artifact(tmp_path_factory) -> str:
    # The kernel is written by hand; the default schedules have nothing to do with it.
    artifact = tvmq.compile(_Sdot, target="aarch64-dotprod",
                            disabled_passes=["ApplyDefaultSchedule"])
    return artifact.export(tmp_path_factory.mktemp("sdot") / "sdot.tar")


def test_sdot_runs_on_a_cpu_with_dotprod(sdot_artifact):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-128, 128, 16, dtype=np.int8) for _ in range(2))
    (c,) = emulate.run_emulated(sdot_artifact, {"a": a, "b": b}, cpu="cortex-a76").values()
    expected = (a.astype(np.int32) * b).reshape(4, 4).sum(axis=1)
    np.testing.assert_array_equal(c, expected)


def test_sdot_dies_with_sigill_without_dotprod(sdot_artifact):
    a = np.ones(16, np.int8)
    with pytest.raises(ArtifactError, match=r"'cortex-a53' \(asimd\).*SIGILL.*asimddp.*'max'"):
        emulate.run_emulated(sdot_artifact, {"a": a, "b": a}, cpu="cortex-a53")


def test_cli_run_emulate(build, images, tmp_path):
    np.savez(tmp_path / "in.npz", input=images[0])
    result = tvmq_cli("run", build("aarch64-dotprod"), "--emulate",
                      "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"))
    assert "output 'logits' float32 (1, 10)" in result.stdout
    expected = tvmq.runtime.load(build("x86")).run(input=images[0])["logits"]
    assert relative_error(np.load(tmp_path / "out.npz")["logits"], expected) <= 1e-5


def test_cli_refuses_timing_under_emulation(build):
    result = tvmq_cli("run", build("aarch64"), "--emulate", "--print-time", check=1)
    assert "timing under emulation is meaningless" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape, out_channels, k, padding", [
    ((1, 6, 9, 9), 16, 3, (1, 1, 1, 1)),    # 6 channels: the second quad padded
    ((1, 16, 7, 7), 8, 1, (0, 0, 0, 0)),
])
def test_int8_conv_through_sdot_is_exact(tmp_path, shape, out_channels, k, padding):
    # The blocked kernel's int8 quad form, tensorized with sdot, run under qemu.
    from test_conv_blocked import _conv_module, reference_conv

    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (out_channels, shape[1], k, k)).astype(np.int8)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    artifact = tvmq.compile(_conv_module(shape, w, (1, 1), padding, (1, 1), "int32"),
                            target="aarch64-dotprod")
    path = artifact.export(tmp_path / "conv.tar")
    (out,) = emulate.run_emulated(path, {"x": x}, cpu="cortex-a76").values()
    np.testing.assert_array_equal(out, 2 * reference_conv(x, w, (1, 1), padding, (1, 1),
                                                          np.int64))
