"""cuda-sm80: NVIDIA compute capability 8.0 (A100)."""

from .preset import TargetPreset, cuda_target

PRESET = TargetPreset(
    "cuda-sm80",
    cuda_target("sm_80"),
    "NVIDIA sm_80 (A100)",
    ("fp16 tensor cores", "int8 tensor cores", "int4 tensor cores"),
)
