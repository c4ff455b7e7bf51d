"""Cross-target builds on this x86 machine: an aarch64 library and CUDA device code."""

from __future__ import annotations

import shutil
import struct
import tarfile

import pytest

import tvmq

_EM_X86_64, _EM_AARCH64 = 62, 183


def _elf_machine(artifact_path) -> int:
    with tarfile.open(artifact_path) as tar:
        header = tar.extractfile("model.so").read(20)
    assert header[:4] == b"\x7fELF"
    return struct.unpack("<H", header[18:20])[0]


def test_x86_library_is_x86(tiny_artifact):
    assert _elf_machine(tiny_artifact) == _EM_X86_64


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs Debian's g++-aarch64-linux-gnu (make setup-system)")
@pytest.mark.parametrize("target", ["aarch64", "aarch64-dotprod"])
def test_aarch64_artifact_builds_here(tiny_model_path, tmp_path, target):
    path = tvmq.compile(tiny_model_path, target=target).export(tmp_path / "arm.tar")
    assert _elf_machine(path) == _EM_AARCH64


def test_cuda_artifact_builds_without_gpu(tiny_model_path, tmp_path):
    artifact = tvmq.compile(tiny_model_path, target="cuda-sm86")
    sources = artifact.device_sources()
    assert set(sources) == {"cuda"}
    assert "__global__" in sources["cuda"]
    path = artifact.export(tmp_path / "gpu.tar")
    assert _elf_machine(path) == _EM_X86_64
    assert artifact.manifest["device"] == "cuda"
