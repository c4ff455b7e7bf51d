"""aarch64-dotprod: ARMv8.2-A with the dot-product extension (sdot/udot for int8)."""

from .preset import TargetPreset, aarch64_target

PRESET = TargetPreset(
    "aarch64-dotprod",
    aarch64_target("+dotprod"),
    "64-bit ARM, NEON + dotprod (Cortex-A76 and later)",
    ("NEON", "sdot/udot (int8 dot)"),
)
