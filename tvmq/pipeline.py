"""The build pipeline as data: an ordered list of ``tvm.transform.Pass``.

``pipeline(target, config)`` returns the passes the build runs, tvmq's and TVM's, so a
user can print the list, drop a pass by name, insert their own, or run it with
``tvm.transform.Sequential`` (inside ``with target:``, as TVM's own backend pipelines
run). Each target kind contributes its lowering stages through ``_BACKENDS``; later
stages (quantization, algorithm choice, default schedules) add their passes here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline

from . import targets
from .config import CompileConfig, QuantizeMode
from .conv_measure import measurer
from .errors import ConfigError, PipelineError
from .kernels import RecordKernelOps
from .layer_latency import layer_timer
from .passes._conv import IntDot
from .passes.annotate import AnnotateQuantization
from .passes.calibrate import Calibrate
from .passes.conv_algorithm import ChooseConvAlgorithm, ConvPolicy
from .passes.kernel_origins import RecordKernelOrigins, TagOrigins
from .passes.matmul_blocked import BlockMatmulWeights
from .passes.realize import RealizeQuantization
from .passes.select_bits import SelectBits
from .qconfig import QConfig
from .schedules import default_schedule_passes
from .schedules.apply_records import ApplyTuningRecords
from .schedules.cpu_common import weight_block
from .schedules.cuda_int4 import int4_tensor_cores
from .schedules.shipped import shipped_records
from .schedules.verify import runs_here

# The TVM backend module whose stage functions lower a module for each target kind.
_BACKENDS: dict[str, ModuleType] = {
    "llvm": cpu_generic_pipeline,
    "cuda": cuda_pipeline,
}


def pipeline(
    target: str | Mapping[str, Any] | targets.TargetPreset,
    config: CompileConfig | None = None,
) -> list[tvm.transform.Pass]:
    """The ordered passes that turn an imported module into one ready for ``tvm.compile``.

    Parameters
    ----------
    target : str, dict or TargetPreset
        A preset name (``tvmq targets`` lists them) or a TVM target dict.
    config : CompileConfig, optional
        Quantization, disabled passes and tuning records.
    """
    config = config or CompileConfig()
    preset = targets.resolve(target)
    tvm_target = preset.tvm_target()
    backend = _BACKENDS[tvm_target.kind.name]
    passes = [
        # Scale and shift of inference batch norms fold into the conv weights before them.
        relax.transform.FoldBatchnormToConv2D(),
        # What stays (batch norm after a non-conv, layer norm...) becomes plain arithmetic.
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        # Weight-only subgraphs (transposes, reshapes, folded batch norms) become constants.
        relax.transform.FoldConstant(),
        # INT8 / INT4 / mixed: select bits, annotate and calibrate need constant weights
        # and must run before lowering.
        *_quantization_passes(config, preset),
        # QDQ (ours, or a pre-quantized ONNX model's) becomes integer-only compute before
        # LegalizeOps lowers it; a module without QDQ passes through unchanged.
        # (uint8 activations, zero point + 128, where the kernels multiply u8 x s8: VNNI.)
        # INT4 layers are built as the CPU's blocked kernels, their weights unpacked inside.
        # W4A4 matmuls on CUDA sm_75..sm_89 multiply int4 by int4 on tensor cores.
        RealizeQuantization(unsigned_activations=int_dot(preset) is IntDot.QUADS,
                            weight_block=weight_block(tvm_target), int_dot=int_dot(preset),
                            int4_tensor_cores=int4_tensor_cores(tvm_target)),
        # Each float convolution takes its algorithm: direct, im2col + GEMM or Winograd.
        _conv_algorithm_pass(preset, config),
        # Matmuls with constant weights read them blocked by output column (CPUs).
        BlockMatmulWeights(weight_block(tvm_target), int_dot(preset)),
        # exp, erf, tanh and softmax as TVM's vectorizable polynomial approximations (float32
        # error ~1e-7); libm's scalar erf made BERT's GELU epilogue cost as much as its
        # 768x3072 matmul. --disabled-pass FastMathTransform keeps the exact functions.
        relax.transform.FastMathTransform(),
        # Library dispatch, LegalizeOps, FuseOps and FuseTIR (the backend's dlight pass left out);
        # around FuseOps, the ONNX nodes each kernel computes are recorded for reports.
        *backend.library_dispatch_passes(tvm_target),
        *_around_fuse_ops(_without_backend_schedules(backend.legalize_passes(tvm_target))),
        # Tuned schedules first; every kernel still unscheduled gets the target's default.
        # Operation counts for reports, read before schedules make kernels opaque.
        RecordKernelOps(),
        *_tuning_passes(config, tvm_target),
        *default_schedule_passes(tvm_target),
        *backend.dataflow_lower_passes(tvm_target),
        *backend.finalize_passes(tvm_target),
    ]
    return _without(passes, config.disabled_passes)


def pass_name(p: tvm.transform.Pass) -> str:
    """The name a pass is listed and disabled by."""
    return str(p.info.name)


def _conv_algorithm_pass(preset, config: CompileConfig) -> tvm.transform.Pass:
    policy = config.conv_algorithm
    measure = None
    if policy is ConvPolicy.MEASURE:
        if preset.runs_here():
            lone = dataclasses.replace(config, conv_algorithm=ConvPolicy.DIRECT, quantize="none")
            measure = measurer(preset, lambda: pipeline(preset, lone), int_dot(preset))
        else:
            # A cross target cannot be timed here; its layers take the fitted rule.
            policy = ConvPolicy.PREDICT
    return ChooseConvAlgorithm(
        policy, overrides=config.conv_overrides, measure=measure,
        weight_block=weight_block(preset.tvm_target()), int_dot=int_dot(preset),
    )


def int_dot(preset) -> IntDot:
    """The integer multiply the target's kernels are laid out for (schedules/int8_dot.py):
    vpdpbusd on uint8 quads with AVX-512 VNNI, vpmaddwd on int16 pairs with AVX2 (the
    fastest int8 multiply-add without VNNI), sdot on int8 quads with the AArch64 dot
    product, int32 products elsewhere."""
    features = preset.required_cpu_features()
    if preset.arch == "aarch64":
        return IntDot.SIGNED_QUADS if "asimddp" in features else IntDot.WIDE
    if preset.arch != "x86_64":
        return IntDot.WIDE
    if "avx512_vnni" in features:
        return IntDot.QUADS
    return IntDot.PAIRS if "avx2" in features else IntDot.WIDE


def _around_fuse_ops(passes: list[tvm.transform.Pass]) -> list[tvm.transform.Pass]:
    index = [pass_name(p) for p in passes].index("FuseOps")
    fuse_ops, rest = passes[index], passes[index + 1 :]
    return [*passes[:index], TagOrigins(), fuse_ops, RecordKernelOrigins(), *rest]


def _without_backend_schedules(passes: list[tvm.transform.Pass]) -> list[tvm.transform.Pass]:
    # The backend's own dlight pass (CUDA) would schedule every kernel before tuned records
    # and tvmq's rules see it; schedules/ lists TVM's rules after its own instead.
    return [p for p in passes if pass_name(p) != "ApplyDefaultSchedule"]


def _quantization_passes(config: CompileConfig, preset) -> list[tvm.transform.Pass]:
    if config.quantize == QuantizeMode.NONE:
        return []
    if config.calibration_data is None:
        raise ConfigError(
            f"--quantize {config.quantize.value} needs calibration data; pass "
            "--calibration-data FILE.npz (arrays named after the model inputs, first axis = "
            "samples)"
        )
    qconfig = config.qconfig or QConfig()
    select = []
    if config.quantize == QuantizeMode.INT4:
        # W4A8: every layer's weights at 4 bits; per-layer overrides still win.
        qconfig = dataclasses.replace(qconfig, weight_bits=4)
    elif config.quantize == QuantizeMode.MIXED:
        # Each layer's bits from its measured sensitivity and costs, under the budget.
        select = [SelectBits(config.calibration_data, config.budget, qconfig,
                             measure=_layer_measure(config, preset))]
    return [
        *select,
        AnnotateQuantization(qconfig),
        Calibrate(config.calibration_data, qconfig.calibration, percentile=qconfig.percentile),
    ]


def _layer_measure(config: CompileConfig, preset):
    """A timer of lone layers for a latency budget (None for size and bit-operations)."""
    if config.latency_budget is None:
        return None
    if not preset.runs_here():
        raise ConfigError(
            f"--latency-budget needs each layer timed on the target, and {preset.name} does "
            "not run on this machine; use --size-budget or --bops-budget"
        )
    lone = dataclasses.replace(config, quantize="none", latency_budget=None)
    return layer_timer(preset, lambda: pipeline(preset, lone))


def _tuning_passes(config: CompileConfig, target: tvm.target.Target) -> list[tvm.transform.Pass]:
    # Kernels with a tuned record take its schedule, once it is checked on random inputs:
    # the user's records first, then those shipped for the target. Shipped records were
    # checked on their own kernels when they were made (tests/test_shipped.py checks them
    # again), so a cross build uses them too and only skeleton matches are checked here.
    passes = []
    if config.tuning_records is not None:
        passes.append(ApplyTuningRecords(config.tuning_records, target))
    shipped = shipped_records(target) if config.shipped_records else None
    if shipped is not None:
        passes.append(ApplyTuningRecords(shipped, target, verify=runs_here(target),
                                         source="shipped", checked=True))
    return passes


def _without(passes: list[tvm.transform.Pass], disabled: tuple[str, ...]) -> list:
    names = [pass_name(p) for p in passes]
    unknown = [name for name in disabled if name not in names]
    if unknown:
        raise PipelineError(
            f"--disabled-pass {unknown[0]!r} is not in this pipeline; its passes are: "
            f"{', '.join(dict.fromkeys(names))}"
        )
    return [p for p in passes if pass_name(p) not in disabled]
