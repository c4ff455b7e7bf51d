"""``tvmq.quantize``: annotate, calibrate and realize in one call, plus the report.

The three passes compose like any TVM pass; this is the common case::

    mod = tvmq.load("model.onnx")
    qmod, report = tvmq.quantize(mod, None, "calib.npz", qconfig=tvmq.QConfig())
    report.to_json()   # per layer: scales, zero points, bits, SQNR; ops that stayed float
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .calibration_data import CalibrationSet, CalibrationSource
from .errors import ConfigError
from .passes._qdq import REPORT_ATTR
from .passes.annotate import AnnotateQuantization
from .passes.bit_allocation import Budget
from .passes.calibrate import Calibrate
from .passes.realize import RealizeQuantization
from .passes.select_bits import SelectBits
from .qconfig import QConfig


@dataclass(frozen=True)
class QuantizationReport:
    """What quantization did to each layer, read from ``main``'s report attribute.

    Attributes
    ----------
    layers : tuple of dict
        Per quantized layer: ``name``, ``op``, ``fused`` ops, ``weight_bits``, ``weight_bytes``
        (packed), ``macs`` and ``bops``; under ``--quantize mixed`` also ``sensitivity``,
        ``weight_bytes_by_bits``, ``bops_by_bits``, ``latency_s_by_bits`` (when measured) and
        ``bits_from`` ("solver" or "override"), and where the solver chose the layer's
        activation width (``--bops-budget``) ``activation_sensitivity`` and
        ``activation_bits_from``;
        ``weight_scales``, ``input_scales`` / ``input_zero_points``, ``output_scale`` /
        ``output_zero_point`` (None when the layer's output is float), ``activation_bits``
        and ``sqnr_db`` (of its output against the float model on the calibration data).
    float_ops : tuple of dict
        Ops that stayed float: ``op`` and ``reason``.
    calibration : dict
        Method and number of batches.
    realized : tuple of str
        The ops that became integer kernels, in order.
    """

    layers: tuple[dict, ...] = ()
    float_ops: tuple[dict, ...] = ()
    calibration: Mapping[str, Any] | None = None
    realized: tuple[str, ...] = ()
    unsigned_activations: bool = False

    @classmethod
    def from_module(cls, mod: tvm.IRModule) -> QuantizationReport:
        attrs = mod["main"].attrs or {}
        data = json.loads(str(attrs[REPORT_ATTR])) if REPORT_ATTR in attrs else {}
        return cls(
            layers=tuple(data.get("layers", ())),
            float_ops=tuple(data.get("float_ops", ())),
            calibration=data.get("calibration"),
            realized=tuple(data.get("realized", ())),
            unsigned_activations=bool(data.get("unsigned_activations", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "float_ops": list(self.float_ops),
            "calibration": self.calibration,
            "realized": list(self.realized),
            "unsigned_activations": self.unsigned_activations,
        }

    def summary(self) -> dict[str, Any]:
        """The short form the artifact manifest keeps: scales and bits, no weight lists."""
        layers = [
            {
                key: layer.get(key)
                for key in ("name", "op", "fused", "weight_bits", "activation_bits",
                            "input_scales", "input_zero_points", "output_scale",
                            "output_zero_point", "sqnr_db", "weight_bytes", "bops",
                            "sensitivity", "bits_from", "latency_s_by_bits",
                            "activation_sensitivity", "activation_bits_from")
            }
            for layer in self.layers
        ]
        return {"layers": layers, "float_ops": list(self.float_ops),
                "realized": len(self.realized)}


def quantize(
    mod: tvm.IRModule,
    params: Mapping[str, np.ndarray] | None,
    dataset: CalibrationSource | CalibrationSet,
    *,
    qconfig: QConfig | None = None,
    unsigned_activations: bool = False,
    budget: Budget | None = None,
) -> tuple[tvm.IRModule, QuantizationReport]:
    """Quantize ``mod`` to integer-only INT8 with post-training calibration.

    Parameters
    ----------
    mod : IRModule
        A module from :func:`tvmq.load` (weights bound as constants).
    params : mapping of str to array, optional
        Weights still held as ``main`` parameters; they are bound as constants first.
    dataset : path, iterable of dicts or CalibrationSet
        Calibration data (see :mod:`tvmq.calibration_data`).
    qconfig : QConfig, optional
        Bits, granularity, scheme, method, layers to skip.
    unsigned_activations : bool
        uint8 activations for x86 VNNI (bit-identical results).
    budget : Budget, optional
        Mixed INT4/INT8: choose each layer's weight bits under this budget (SelectBits).

    Returns
    -------
    (IRModule, QuantizationReport)
    """
    qconfig = qconfig or QConfig()
    if not isinstance(qconfig, QConfig):
        raise ConfigError(f"qconfig must be a tvmq.QConfig, not {type(qconfig).__name__}")
    if params:
        mod = relax.transform.BindParams("main", dict(params))(mod)
    passes = [
        # Batch norms fold into conv weights; weight-only subgraphs become constants.
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        *quantization_passes(qconfig, dataset, unsigned_activations=unsigned_activations,
                             budget=budget),
    ]
    mod = tvm.transform.Sequential(passes)(mod)
    return mod, QuantizationReport.from_module(mod)


def quantization_passes(
    qconfig: QConfig,
    dataset: CalibrationSource | CalibrationSet,
    *,
    unsigned_activations: bool = False,
    budget: Budget | None = None,
) -> list[tvm.transform.Pass]:
    """(Select bits,) annotate, calibrate, realize: the quantization passes."""
    select = [SelectBits(dataset, budget, qconfig)] if budget is not None else []
    return [
        *select,
        AnnotateQuantization(qconfig),
        Calibrate(dataset, qconfig.calibration, percentile=qconfig.percentile),
        RealizeQuantization(unsigned_activations=unsigned_activations),
    ]
