"""cuda-sm89: NVIDIA compute capability 8.9 (RTX 40xx / L4)."""

from .preset import TargetPreset, cuda_target

PRESET = TargetPreset(
    "cuda-sm89",
    cuda_target("sm_89"),
    "NVIDIA sm_89 (RTX 40xx / L4)",
    ("fp16 tensor cores", "int8 tensor cores", "int4 tensor cores"),
)
