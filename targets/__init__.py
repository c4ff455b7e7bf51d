"""Target presets: ``tvmq.targets.resolve("x86-vnni")`` or a raw TVM target dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tvm

from tvmq.errors import TargetError

from . import (
    aarch64,
    aarch64_dotprod,
    cuda_sm80,
    cuda_sm86,
    cuda_sm89,
    cuda_sm90,
    x86,
    x86_avx2,
    x86_avx512,
    x86_vnni,
)
from .preset import TargetPreset

PRESETS: dict[str, TargetPreset] = {
    module.PRESET.name: module.PRESET
    for module in (
        x86, x86_avx2, x86_avx512, x86_vnni, aarch64, aarch64_dotprod,
        cuda_sm80, cuda_sm86, cuda_sm89, cuda_sm90,
    )
}

__all__ = ["PRESETS", "TargetPreset", "resolve"]


def resolve(target: str | Mapping[str, Any] | TargetPreset) -> TargetPreset:
    """A preset by name, or a preset wrapping a raw TVM target dict."""
    if isinstance(target, TargetPreset):
        return target
    if isinstance(target, Mapping):
        return _from_dict(dict(target))
    if isinstance(target, str) and target.lstrip().startswith("{"):
        import json

        try:
            return _from_dict(json.loads(target))
        except json.JSONDecodeError as err:
            raise TargetError(f"target '{target}' is not valid JSON ({err.msg})") from None
    if target not in PRESETS:
        raise TargetError(
            f"unknown target '{target}'; presets are: {', '.join(PRESETS)} "
            "(or pass a TVM target dict)"
        )
    return PRESETS[target]


def _from_dict(target: dict[str, Any]) -> TargetPreset:
    if target.get("kind") not in ("llvm", "cuda"):
        raise TargetError(
            f"target dict {target} has kind {target.get('kind')!r}; tvmq builds for "
            "'llvm' (x86, aarch64) and 'cuda'"
        )
    try:
        tvm.target.Target(target)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TargetError(f"TVM rejects target dict {target}: {first}") from None
    return TargetPreset("custom", target, "a raw TVM target dict")
