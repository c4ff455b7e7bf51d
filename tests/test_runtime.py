"""Artifacts: export, load, run, benchmark, and every refusal on load and on input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import onnx
import pytest
from conftest import reference, relative_error
from tvmq.targets.preset import host_cpu_features

import tvmq
from tvmq.errors import ArtifactError, InputError


def test_roundtrip_matches_onnxruntime(tiny_artifact, tiny_model_path):
    model = tvmq.runtime.load(tiny_artifact)
    assert [(i.name, i.shape, i.dtype) for i in model.inputs] == [("x", (1, 1, 8, 8), "float32")]
    assert [(o.name, o.shape) for o in model.outputs] == [("y", (1, 3))]
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    outputs = model.run(x=x)
    (expected,) = reference(onnx.load(tiny_model_path), {"x": x})
    assert relative_error(outputs["y"], expected) <= 1e-5


def test_manifest_contents(tiny_artifact):
    with tarfile.open(tiny_artifact) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "model.so"]
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert manifest["format"] == "tvmq-artifact"
    assert manifest["tvmq_version"] == tvmq.__version__
    assert manifest["target"]["preset"] == "x86"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": [1, 3], "dtype": "float32"}]
    assert manifest["quantization"]["mode"] == "none"
    assert "FuseOps" in manifest["passes"]


def test_benchmark_statistics(tiny_artifact):
    result = tvmq.runtime.load(tiny_artifact).benchmark(repeat=3, number=2)
    assert result.repeat == 3 and result.number == 2
    assert 0 < result.min_ms <= result.median_ms <= result.max_ms
    assert set(result.to_json()) >= {"median_ms", "mean_ms", "min_ms", "max_ms", "repeat"}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((1, 1, 8, 8), np.float32), "z": np.zeros(1)}, r"no input 'z'; its inputs"),
        ({}, r"input 'x' is missing"),
        ({"x": np.zeros((1, 1, 9, 9), np.float32)},
         r"input 'x' has shape \(1, 1, 9, 9\) but the model wants \(1, 1, 8, 8\)"),
        ({"x": np.zeros((1, 1, 8, 8), np.float64)},
         r"input 'x' has dtype float64 but the model wants float32"),
    ],
)
def test_inputs_checked(tiny_artifact, inputs, message):
    model = tvmq.runtime.load(tiny_artifact)
    with pytest.raises(InputError, match=message):
        model.run(**inputs)


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"artifact '.*none.tar' does not exist"):
        tvmq.runtime.load(tmp_path / "none.tar")


def test_not_a_tar(tmp_path):
    path = tmp_path / "model.tar"
    path.write_text("hello")
    with pytest.raises(ArtifactError, match=r"is not a tvmq artifact \(not a tar file\)"):
        tvmq.runtime.load(path)


def _rewrite(source: str, dest, *, manifest=None, extra=None, drop=()):
    """Copy an artifact, replacing its manifest and adding members."""
    with tarfile.open(source) as tar_in, tarfile.open(dest, "w") as tar_out:
        for member in tar_in.getmembers():
            if member.name in drop:
                continue
            data = tar_in.extractfile(member).read()
            if member.name == "manifest.json" and manifest is not None:
                data = json.dumps(manifest(json.loads(data))).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
        for info, data in extra or []:
            tar_out.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def test_tar_without_manifest(tiny_artifact, tmp_path):
    path = _rewrite(tiny_artifact, tmp_path / "a.tar", drop=("manifest.json",))
    with pytest.raises(ArtifactError, match=r"is not a tvmq artifact \(no manifest.json\)"):
        tvmq.runtime.load(path)


def test_foreign_manifest(tiny_artifact, tmp_path):
    path = _rewrite(tiny_artifact, tmp_path / "a.tar", manifest=lambda m: {"format": "other"})
    with pytest.raises(ArtifactError, match=r"manifest is not tvmq-artifact"):
        tvmq.runtime.load(path)


def test_tvm_version_mismatch(tiny_artifact, tmp_path):
    path = _rewrite(
        tiny_artifact, tmp_path / "a.tar", manifest=lambda m: {**m, "tvm_version": "0.19.0"}
    )
    with pytest.raises(ArtifactError, match=r"built with TVM 0.19.0 but this is TVM"):
        tvmq.runtime.load(path)


def test_newer_format_refused(tiny_artifact, tmp_path):
    path = _rewrite(
        tiny_artifact, tmp_path / "a.tar", manifest=lambda m: {**m, "format_version": 99}
    )
    with pytest.raises(ArtifactError, match=r"artifact format 99, newer than this tvmq reads"):
        tvmq.runtime.load(path)


def test_other_cpu_features_refused(tiny_artifact, tmp_path):
    path = _rewrite(
        tiny_artifact, tmp_path / "a.tar",
        manifest=lambda m: {**m, "cpu_features": ["avx512_fancy"], "target": {"preset": "x86-z"}},
    )
    with pytest.raises(ArtifactError, match=r"needs CPU features this CPU lacks \(avx512_fancy\)"):
        tvmq.runtime.load(path)


def test_other_architecture_refused(tiny_artifact, tmp_path):
    path = _rewrite(tiny_artifact, tmp_path / "a.tar", manifest=lambda m: {**m, "arch": "riscv64"})
    with pytest.raises(ArtifactError, match=r"built for riscv64 .* but this machine is x86_64"):
        tvmq.runtime.load(path)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("../evil.so", tarfile.REGTYPE), ("/tmp/evil.so", tarfile.REGTYPE),
     ("link.so", tarfile.SYMTYPE)],
)
def test_unsafe_members_refused(tiny_artifact, tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    data = None
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    else:
        data = b"x"
        info.size = 1
    path = _rewrite(tiny_artifact, tmp_path / "a.tar", extra=[(info, data)])
    with pytest.raises(ArtifactError, match=r"unsafe member"):
        tvmq.runtime.load(path)
    assert not (tmp_path.parent / "evil.so").exists()


@pytest.mark.skipif("avx512_vnni" in host_cpu_features(), reason="this CPU has VNNI")
def test_vnni_artifact_refused_on_this_cpu(tiny_model_path, tmp_path):
    tvmq.compile(tiny_model_path, target="x86-vnni").export(tmp_path / "vnni.tar")
    with pytest.raises(ArtifactError, match=r"target x86-vnni, which needs CPU features"):
        tvmq.runtime.load(tmp_path / "vnni.tar")


def test_export_into_missing_directory(tiny_model_path, tmp_path):
    artifact = tvmq.compile(tiny_model_path, target="x86")
    with pytest.raises(ArtifactError, match=r"output directory .* does not exist"):
        artifact.export(tmp_path / "no" / "such" / "dir" / "a.tar")


def test_export_replaces_atomically(tiny_artifact, tiny_model_path, tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"old")
    tvmq.compile(tiny_model_path, target="x86").export(path)
    assert tarfile.is_tarfile(path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]
