"""Typed compile options; each field maps one-to-one onto a ``tvmq compile`` flag."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import ConfigError


class QuantizeMode(StrEnum):
    """``--quantize``: the precision the model's layers are realized in."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    MIXED = "mixed"


# Modes whose passes exist in this version; the others are refused, never ignored.
BUILT_QUANTIZE_MODES: frozenset[QuantizeMode] = frozenset({QuantizeMode.NONE})


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
    """

    quantize: QuantizeMode = QuantizeMode.NONE
    disabled_passes: tuple[str, ...] = field(default_factory=tuple)
    tuning_records: str | None = None

    def __post_init__(self) -> None:
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
