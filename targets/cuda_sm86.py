"""cuda-sm86: NVIDIA compute capability 8.6 (RTX 30xx / A10)."""

from .preset import TargetPreset, cuda_target

PRESET = TargetPreset(
    "cuda-sm86",
    cuda_target("sm_86"),
    "NVIDIA sm_86 (RTX 30xx / A10)",
    ("fp16 tensor cores", "int8 tensor cores", "int4 tensor cores"),
)
