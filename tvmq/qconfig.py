"""Typed quantization options: what ``AnnotateQuantization`` and ``Calibrate`` are told.

Layer names are the ones the quantization report lists (``conv2d_0``, ``add_1``, ...: the
op name and its position among ops of that kind in ``main``); ``skip`` and ``overrides``
match them, or op names (``nn.softmax``, ``conv2d``), exactly or as globs (``conv2d_*``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from .errors import ConfigError


class Granularity(StrEnum):
    """How many scales a weight tensor gets."""

    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class ActivationScheme(StrEnum):
    """Symmetric: zero point 0. Asymmetric: the zero point shifts the range to fit it."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class CalibrationMethod(StrEnum):
    """How a tensor's range is chosen from its calibration statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    KL = "kl"
    MSE = "mse"


# Activations live in an int8 (or uint8) container; 4-bit ones are clamped to 16 levels
# (a W4A4 layer reads them). Weights may be narrower still.
_ACTIVATION_BITS = (4, 8)
_WEIGHT_BITS = range(2, 9)


def _enum(kind: type[StrEnum], value, flag: str) -> StrEnum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(v.value for v in kind)
        raise ConfigError(f"{flag} {value!r} is not valid; choose one of: {choices}") from None


def _check_weight_bits(bits, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _WEIGHT_BITS:
        raise ConfigError(f"{where} weight_bits={bits!r} is not valid; use an integer from 2 to 8")


def _check_activation_bits(bits, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _ACTIVATION_BITS:
        raise ConfigError(f"{where} activation_bits={bits!r} is not supported; use 8 or 4")


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings that replace the ``QConfig`` defaults; ``None`` keeps the default."""

    weight_bits: int | None = None
    weight_granularity: Granularity | None = None
    activation_scheme: ActivationScheme | None = None
    activation_bits: int | None = None

    def __post_init__(self) -> None:
        if self.weight_bits is not None:
            _check_weight_bits(self.weight_bits, "override")
        if self.activation_bits is not None:
            _check_activation_bits(self.activation_bits, "override")
        if self.weight_granularity is not None:
            object.__setattr__(
                self,
                "weight_granularity",
                _enum(Granularity, self.weight_granularity, "override weight_granularity"),
            )
        if self.activation_scheme is not None:
            object.__setattr__(
                self,
                "activation_scheme",
                _enum(ActivationScheme, self.activation_scheme, "override activation_scheme"),
            )


@dataclass(frozen=True)
class QConfig:
    """How a model is quantized.

    Attributes
    ----------
    weight_bits : int
        Bits of the (symmetric) weights, 2 to 8; kept in int8 containers.
    activation_bits : int
        Bits of the activations a layer reads: 8, or 4 (16 levels, in the same int8 / uint8
        container; a tensor read by an 8-bit layer stays 8-bit, see ``passes/annotate.py``).
    weight_granularity : Granularity
        One scale per output channel (default) or per tensor.
    activation_scheme : ActivationScheme
        Asymmetric (default: a ReLU output uses all 256 levels) or symmetric.
    calibration : CalibrationMethod
        How activation ranges are chosen.
    percentile : float
        For ``calibration="percentile"``: the share of |values| kept, in (50, 100].
    skip : tuple of str
        Layer names or op names (exact or glob) that stay float.
    overrides : mapping of str to LayerOverride
        Per-layer settings, keyed by layer name or glob.
    weight_group_size : int, optional
        Group-wise INT4: layers at 4 bits or fewer get one scale per group of this many
        input elements of each output channel (an integer multiple of the channel's scale,
        so the kernel stays integer-only). None: per channel.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    weight_granularity: Granularity = Granularity.PER_CHANNEL
    activation_scheme: ActivationScheme = ActivationScheme.ASYMMETRIC
    calibration: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, LayerOverride] = field(default_factory=dict)
    weight_group_size: int | None = None

    def __post_init__(self) -> None:
        _check_weight_bits(self.weight_bits, "QConfig")
        group = self.weight_group_size
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)
                                  or group < 2):
            raise ConfigError(
                f"QConfig weight_group_size={group!r} is not valid; use an integer >= 2 "
                "(e.g. 32) or None for per-channel scales"
            )
        _check_activation_bits(self.activation_bits, "QConfig")
        object.__setattr__(
            self, "weight_granularity",
            _enum(Granularity, self.weight_granularity, "QConfig weight_granularity"),
        )
        object.__setattr__(
            self, "activation_scheme",
            _enum(ActivationScheme, self.activation_scheme, "QConfig activation_scheme"),
        )
        object.__setattr__(
            self, "calibration", _enum(CalibrationMethod, self.calibration, "QConfig calibration")
        )
        percentile = self.percentile
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, int | float)
            or not math.isfinite(percentile)
            or not 50.0 < percentile <= 100.0
        ):
            raise ConfigError(
                f"QConfig percentile={percentile!r} is not valid; use a number in (50, 100], "
                "e.g. 99.99"
            )
        if isinstance(self.skip, str):
            raise ConfigError(
                f"QConfig skip={self.skip!r} is a string; pass a tuple of names, "
                f"e.g. skip=({self.skip!r},)"
            )
        skip = tuple(self.skip)
        for name in skip:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"QConfig skip entry {name!r} is not a layer or op name")
        object.__setattr__(self, "skip", skip)
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(
                "QConfig overrides must map layer names to LayerOverride, "
                "e.g. {'conv2d_0': LayerOverride(weight_bits=4)}"
            )
        for key, value in self.overrides.items():
            if not isinstance(key, str) or not isinstance(value, LayerOverride):
                raise ConfigError(
                    f"QConfig overrides entry {key!r}: {value!r} is not a layer name mapped to "
                    "a LayerOverride"
                )
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def skips(self, layer: str, op: str) -> bool:
        """Whether ``skip`` names this layer or its op (``nn.conv2d`` or ``conv2d``)."""
        names = (layer, op, op.rsplit(".", 1)[-1])
        return any(fnmatch.fnmatchcase(n, pattern) for pattern in self.skip for n in names)

    def override_bits(self, layer: str) -> int | None:
        """The weight bits a per-layer override sets for this layer, or None."""
        return self._override(layer, "weight_bits")

    def override_activation_bits(self, layer: str) -> int | None:
        """The activation bits a per-layer override sets for this layer, or None."""
        return self._override(layer, "activation_bits")

    def activation_bits_for(self, layer: str) -> int:
        """The activation bits this layer reads, after per-layer overrides."""
        bits = self.override_activation_bits(layer)
        return self.activation_bits if bits is None else bits

    def _override(self, layer: str, field_name: str) -> int | None:
        bits = None
        for pattern, override in self.overrides.items():
            value = getattr(override, field_name)
            if fnmatch.fnmatchcase(layer, pattern) and value is not None:
                bits = value
        return bits

    def for_layer(self, layer: str) -> tuple[int, Granularity, ActivationScheme]:
        """Weight bits, weight granularity and activation scheme for one layer."""
        bits, granularity, scheme = (
            self.weight_bits, self.weight_granularity, self.activation_scheme
        )
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                bits = override.weight_bits or bits
                granularity = override.weight_granularity or granularity
                scheme = override.activation_scheme or scheme
        return bits, granularity, scheme
