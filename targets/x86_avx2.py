"""x86-avx2: any x86-64 CPU with AVX2 and FMA (Haswell, Zen and later)."""

from .preset import TargetPreset, x86_target

PRESET = TargetPreset(
    "x86-avx2", x86_target("x86-64-v3"), "x86-64 with AVX2 + FMA", ("AVX2", "FMA3")
)
