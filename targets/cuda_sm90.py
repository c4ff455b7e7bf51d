"""cuda-sm90: NVIDIA compute capability 9.0 (H100)."""

from .preset import TargetPreset, cuda_target

PRESET = TargetPreset(
    "cuda-sm90",
    cuda_target("sm_90"),
    "NVIDIA sm_90 (H100)",
    ("fp16 tensor cores", "int8 tensor cores", "wgmma"),
)
