"""The tvmq command line: verbs, flags, exit status and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import reference, relative_error


def tvmq_cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "tvmq", *args], capture_output=True, text=True, timeout=600
    )
    if check is not None:
        assert result.returncode == check, result.stderr
    return result


def test_targets_lists_presets():
    out = tvmq_cli("targets").stdout
    for name in ("x86-vnni", "aarch64-dotprod", "cuda-sm90"):
        assert name in out


def test_passes_lists_pipeline():
    out = tvmq_cli("passes", "--target", "x86").stdout
    assert "FuseOps" in out and "LegalizeOps" in out


def test_compile_run_matches_onnxruntime(tiny_model_path, tmp_path):
    artifact = tmp_path / "tiny.tar"
    out = tvmq_cli("compile", tiny_model_path, "--target", "x86", "-o", str(artifact)).stdout
    assert "compiled" in out and "tiny.tar" in out
    x = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    tvmq_cli(
        "run", str(artifact), "--inputs", str(tmp_path / "in.npz"),
        "--outputs", str(tmp_path / "out.npz"), "--print-time", "--repeat", "3", "--number", "1",
        "--benchmark-json", str(tmp_path / "bench.json"),
    )
    (expected,) = reference(onnx.load(tiny_model_path), {"x": x})
    assert relative_error(np.load(tmp_path / "out.npz")["y"], expected) <= 1e-5
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert {"median_ms", "mean_ms", "min_ms", "max_ms", "repeat"} <= set(bench)
    assert bench["repeat"] == 3


@pytest.mark.parametrize("mode", ["zeros", "ones", "random"])
def test_run_fill_modes(tiny_artifact, mode):
    assert "output 'y' float32 (1, 3)" in tvmq_cli("run", tiny_artifact, "--fill-mode", mode).stdout


def test_usage_error_exits_2():
    result = tvmq_cli("compile", check=2)
    assert "required" in result.stderr


def test_bad_input_shapes_flag_exits_2(tiny_model_path):
    result = tvmq_cli("compile", tiny_model_path, "--input-shapes", "x=1,2", "-o", "a.tar", check=2)
    assert "is not NAME:DxDxD" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compile", "missing.onnx", "-o", "a.tar"], "model file 'missing.onnx' does not exist"),
        (["compile", "{model}", "--target", "z80", "-o", "a.tar"], "unknown target 'z80'"),
        (["compile", "{model}", "--quantize", "int4", "-o", "a.tar"],
         "--quantize int4 needs calibration data"),
        (["compile", "{model}", "--quantize", "mixed", "-o", "a.tar"],
         "--quantize mixed needs exactly one budget"),
        (["compile", "{model}", "--size-budget", "0.6", "-o", "a.tar"],
         "--size-budget only applies to --quantize mixed"),
        (["compile", "{model}", "--calibration-data", "c.npz", "-o", "a.tar"],
         "--calibration-data is only used with --quantize"),
        (["compile", "{model}", "--disabled-pass", "Nope", "-o", "a.tar"],
         "--disabled-pass 'Nope' is not in this pipeline"),
        (["compile", "{model}", "--input-shapes", "images:1x3x8x8", "-o", "a.tar"],
         "input_shapes names 'images' but the inputs"),
        (["compile", "{model}", "--conv-override", "conv=wino", "-o", "a.tar"],
         "'wino' is not a valid ConvAlgorithm"),
        (["run", "missing.tar"], "artifact 'missing.tar' does not exist"),
        (["run", "{artifact}", "--inputs", "missing.npz"], "inputs file 'missing.npz' does not"),
    ],
)
def test_errors_are_one_line_exit_1(tiny_model_path, tiny_artifact, tmp_path, args, message):
    args = [a.format(model=tiny_model_path, artifact=tiny_artifact) for a in args]
    result = tvmq_cli(*args, check=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_wrong_input_name_in_npz(tiny_artifact, tmp_path):
    np.savez(tmp_path / "in.npz", images=np.zeros((1, 1, 8, 8), np.float32))
    result = tvmq_cli("run", tiny_artifact, "--inputs", str(tmp_path / "in.npz"), check=1)
    assert "the model has no input 'images'; its inputs are: x" in result.stderr


def test_verbose_shows_traceback():
    result = tvmq_cli("compile", "missing.onnx", "-o", "a.tar", "--verbose", check=1)
    assert "Traceback" in result.stderr
