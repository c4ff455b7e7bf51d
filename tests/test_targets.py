"""Target presets: listing, resolution, raw dicts and errors."""

from __future__ import annotations

import pytest

from tvmq import targets
from tvmq.errors import TargetError

EXPECTED = [
    "x86", "x86-avx2", "x86-avx512", "x86-vnni", "aarch64", "aarch64-dotprod",
    "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90",
]


def test_presets_listed():
    assert list(targets.PRESETS) == EXPECTED
    for preset in targets.PRESETS.values():
        assert preset.tvm_target().kind.name in ("llvm", "cuda")
        assert preset.enables


def test_unknown_preset_lists_presets():
    with pytest.raises(TargetError, match=r"unknown target 'x87'; presets are: x86, x86-avx2"):
        targets.resolve("x87")


def test_raw_dict_accepted():
    preset = targets.resolve({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert preset.name == "custom"
    assert preset.arch == "aarch64"
    assert "asimd" in preset.required_cpu_features()


def test_raw_dict_with_unknown_kind():
    with pytest.raises(TargetError, match=r"tvmq builds for 'llvm'"):
        targets.resolve({"kind": "vulkan"})


def test_required_features_follow_the_target():
    assert "avx512_vnni" in targets.resolve("x86-vnni").required_cpu_features()
    assert "avx512f" not in targets.resolve("x86-avx2").required_cpu_features()
    assert "asimddp" in targets.resolve("aarch64-dotprod").required_cpu_features()
    assert targets.resolve("cuda-sm80").device == "cuda"
