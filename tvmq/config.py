"""Typed compile options; each field maps one-to-one onto a ``tvmq compile`` flag."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import ConfigError
from .passes.bit_allocation import Budget, BudgetKind
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
    {QuantizeMode.NONE, QuantizeMode.INT8, QuantizeMode.INT4, QuantizeMode.MIXED}
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
    shipped_records : bool
        Apply the records shipped for the target (``schedules/shipped.py``) to kernels the
        user's records do not cover; ``--no-shipped-records`` turns them off.
    qconfig : QConfig, optional
        How ``--quantize int8`` quantizes (default ``QConfig()``).
    calibration_data : path, iterable of dicts or CalibrationSet, optional
        ``--calibration-data``: needed by ``--quantize int8``.
    conv_algorithm : ConvPolicy
        ``--conv-algorithm``: how each float convolution's algorithm is chosen.
    conv_overrides : mapping of ONNX node name (or glob) to ConvAlgorithm
        ``--conv-override NODE=ALGORITHM``: fixed choices that win over the policy.
    size_budget, latency_budget, bops_budget : str or float, optional
        ``--size-budget`` / ``--latency-budget`` / ``--bops-budget`` for ``--quantize mixed``
        (exactly one): a fraction of the all-INT8 model (``0.6``) or an amount
        (``1.5MB``, ``2ms``, ``3G``); see ``passes/bit_allocation.py``.
    """

    quantize: QuantizeMode = QuantizeMode.NONE
    disabled_passes: tuple[str, ...] = field(default_factory=tuple)
    tuning_records: str | None = None
    shipped_records: bool = True
    qconfig: QConfig | None = None
    calibration_data: Any = None
    conv_algorithm: ConvPolicy = ConvPolicy.PREDICT
    conv_overrides: Mapping[str, ConvAlgorithm] = field(default_factory=dict)
    size_budget: str | float | None = None
    latency_budget: str | float | None = None
    bops_budget: str | float | None = None

    @property
    def budget(self) -> Budget | None:
        """The ``--quantize mixed`` budget, parsed; None when no budget flag is given."""
        for kind, text in ((BudgetKind.SIZE, self.size_budget),
                           (BudgetKind.LATENCY, self.latency_budget),
                           (BudgetKind.BOPS, self.bops_budget)):
            if text is not None:
                return Budget.parse(kind, str(text))
        return None

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
        self._check_budget()
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        if self.tuning_records is not None and not os.path.isdir(self.tuning_records):
            raise ConfigError(
                f"tuning records directory '{self.tuning_records}' does not exist; "
                "pass the --records directory of a 'tvmq tune' run"
            )

    def _check_budget(self) -> None:
        given = [flag for flag, value in (("--size-budget", self.size_budget),
                                          ("--latency-budget", self.latency_budget),
                                          ("--bops-budget", self.bops_budget))
                 if value is not None]
        if given and self.quantize != QuantizeMode.MIXED:
            raise ConfigError(f"{given[0]} only applies to --quantize mixed")
        if self.quantize == QuantizeMode.MIXED and len(given) != 1:
            raise ConfigError(
                "--quantize mixed needs exactly one budget: --size-budget, --latency-budget or "
                "--bops-budget (e.g. --size-budget 0.6, a fraction of the INT8 weight bytes)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        _ = self.budget  # parse now, so a bad value fails when the config is made
