"""aarch64: 64-bit ARM with NEON (every ARMv8-A core)."""

from .preset import TargetPreset, aarch64_target

PRESET = TargetPreset("aarch64", aarch64_target(), "64-bit ARM, NEON", ("NEON",))
