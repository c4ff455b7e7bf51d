"""x86-vnni: AVX-512 with VNNI (Cascade Lake, Ice Lake, Zen 4/5): int8 dot products."""

from .preset import TargetPreset, x86_target

PRESET = TargetPreset(
    "x86-vnni",
    x86_target("cascadelake"),
    "x86-64 with AVX-512 VNNI",
    ("AVX2", "AVX-512", "VNNI (int8 dot)"),
)
