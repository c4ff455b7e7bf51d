"""x86-avx512: x86-64 with AVX-512 F/BW/DQ/VL (Skylake-SP, Zen 4 and later)."""

from .preset import TargetPreset, x86_target

PRESET = TargetPreset(
    "x86-avx512", x86_target("x86-64-v4"), "x86-64 with AVX-512", ("AVX2", "AVX-512")
)
