"""Typed compile options; each field maps one-to-one onto a ``tvmq compile`` flag."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import ConfigError
from .passes.conv_algorithm import ConvAlgorithm, ConvPolicy
from .qconfig import QConfig


class QuantizeMode(StrEnum):
    """``--quantize``: the precision the model's layers are realized in."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    MIXED = "mixed"


# Modes whose passes exist in this version; the others are refused, never ignored.
BUILT_QUANTIZE_MODES: frozenset[QuantizeMode] = frozenset(
    {QuantizeMode.NONE, QuantizeMode.INT8}
)


@dataclass(frozen=True)
class CompileConfig:
    """What ``tvmq.pipeline`` and ``tvmq.compile`` build.

    Attributes
    ----------
    quantize : QuantizeMode
        ``--quantize``.
    disabled_passes : tuple of str
        ``--disabled-pass``: names of pipeline passes to leave out.
    tuning_records : str, optional
        ``--tuning-records``: a meta_schedule database directory whose records apply.
    qconfig : QConfig, optional
        How ``--quantize int8`` quantizes (default ``QConfig()``).
    calibration_data : path, iterable of dicts or CalibrationSet, optional
        ``--calibration-data``: needed by ``--quantize int8``.
    conv_algorithm : ConvPolicy
        ``--conv-algorithm``: how each float convolution's algorithm is chosen.
    conv_overrides : mapping of ONNX node name (or glob) to ConvAlgorithm
        ``--conv-override NODE=ALGORITHM``: fixed choices that win over the policy.
    """

    quantize: QuantizeMode = QuantizeMode.NONE
    disabled_passes: tuple[str, ...] = field(default_factory=tuple)
    tuning_records: str | None = None
    qconfig: QConfig | None = None
    calibration_data: Any = None
    conv_algorithm: ConvPolicy = ConvPolicy.PREDICT
    conv_overrides: Mapping[str, ConvAlgorithm] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "conv_algorithm", ConvPolicy(self.conv_algorithm))
            overrides = {str(k): ConvAlgorithm(v) for k, v in dict(self.conv_overrides).items()}
            object.__setattr__(self, "conv_overrides", overrides)
        except ValueError as err:
            raise ConfigError(
                f"{err}; --conv-algorithm is one of {', '.join(p.value for p in ConvPolicy)} "
                f"and --conv-override takes {', '.join(a.value for a in ConvAlgorithm)}"
            ) from None
        try:
            object.__setattr__(self, "quantize", QuantizeMode(self.quantize))
        except ValueError:
            modes = ", ".join(m.value for m in QuantizeMode)
            raise ConfigError(
                f"--quantize {self.quantize!r} is not a mode; choose one of: {modes}"
            ) from None
        if self.quantize not in BUILT_QUANTIZE_MODES:
            raise ConfigError(
                f"--quantize {self.quantize.value} is not built in this version of tvmq yet; "
                "use --quantize none"
            )
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        if self.tuning_records is not None and not os.path.isdir(self.tuning_records):
            raise ConfigError(
                f"tuning records directory '{self.tuning_records}' does not exist; "
                "pass the --records directory of a 'tvmq tune' run"
            )
