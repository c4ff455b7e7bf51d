"""The build driver: import, run the pipeline, compile, describe the result.

``compile`` is a thin driver over ``pipeline``: every transformation it applies is a pass
in that list, run one at a time so ``dump_ir`` can write the module after each.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tvm
from tvm import relax

from . import __version__, targets
from .artifact import FORMAT, FORMAT_VERSION, Artifact
from .calibration_data import CalibrationSource
from .config import CompileConfig, QuantizeMode
from .errors import PipelineError, TvmqError
from .frontend import INPUT_NAMES_ATTR, OUTPUT_NAMES_ATTR, TensorInfo, load
from .kernels import kernel_table
from .passes.conv_algorithm import CONV_ALGORITHMS_ATTR, ConvPolicy
from .pipeline import pass_name, pipeline
from .qconfig import QConfig
from .quantize import QuantizationReport


def compile(
    model: str | os.PathLike | tvm.IRModule,
    *,
    target: str | Mapping[str, Any] | targets.TargetPreset = "x86",
    quantize: QuantizeMode | str | None = None,
    tuning_records: str | None = None,
    shipped_records: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    disabled_passes: Sequence[str] = (),
    dump_ir: str | os.PathLike | None = None,
    calibration_data: CalibrationSource | None = None,
    qconfig: QConfig | None = None,
    quantize_report: str | os.PathLike | None = None,
    conv_algorithm: ConvPolicy | str = ConvPolicy.PREDICT,
    conv_overrides: Mapping[str, str] | None = None,
    size_budget: str | float | None = None,
    latency_budget: str | float | None = None,
    bops_budget: str | float | None = None,
) -> Artifact:
    """Compile a model for a target.

    Parameters
    ----------
    model : path or IRModule
        An ``.onnx`` file, or a module from :func:`tvmq.load`.
    target : str, dict or TargetPreset
        A preset name (``tvmq targets``) or a TVM target dict.
    quantize : {"none", "int8", "int4", "mixed"}, optional
    tuning_records : str, optional
        A meta_schedule database directory; matching kernels take its schedules.
    shipped_records : bool
        Whether kernels the records do not cover may take the schedules tuned for the
        target and shipped with tvmq (see :mod:`tvmq.schedules.shipped`).
    input_shapes : mapping, optional
        Static shapes for inputs with symbolic dimensions (only with a file path).
    disabled_passes : sequence of str
        Names of pipeline passes to leave out.
    dump_ir : path, optional
        A directory that receives the module after each pass.
    calibration_data : path or iterable of dicts, optional
        Calibration inputs for ``quantize="int8"`` (see :mod:`tvmq.calibration_data`).
    qconfig : QConfig, optional
        How ``quantize="int8"`` quantizes.
    quantize_report : path, optional
        A JSON file that receives the per-layer quantization report.
    conv_algorithm : {"predict", "measure", "direct", "gemm", "winograd"}
        How each float convolution's algorithm is chosen (see passes/conv_algorithm.py).
    conv_overrides : mapping, optional
        ONNX node name (or glob) -> algorithm, winning over ``conv_algorithm``.
    size_budget, latency_budget, bops_budget : str or float, optional
        The budget of ``quantize="mixed"`` (exactly one): a fraction of the all-INT8 model
        (``0.6``) or an amount (``"1.5MB"``, ``"2ms"``, ``"3G"``).

    Returns
    -------
    Artifact
        Call ``.export(path)`` to write it.
    """
    config = CompileConfig(
        quantize=QuantizeMode(quantize) if quantize else QuantizeMode.NONE,
        disabled_passes=tuple(disabled_passes),
        tuning_records=tuning_records,
        shipped_records=shipped_records,
        qconfig=qconfig,
        calibration_data=calibration_data,
        conv_algorithm=conv_algorithm,
        conv_overrides=dict(conv_overrides or {}),
        size_budget=size_budget,
        latency_budget=latency_budget,
        bops_budget=bops_budget,
    )
    preset = targets.resolve(target)
    mod = model if isinstance(model, tvm.IRModule) else load(model, input_shapes)
    inputs, outputs = describe_io(mod)
    passes = pipeline(preset, config)
    tvm_target = preset.tvm_target()
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        mod = run_passes(mod, passes, dump_ir)
        report = QuantizationReport.from_module(mod)
        kernels = kernel_table(mod)
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tvmq_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"preset": preset.name, "tvm": preset.target},
        "arch": preset.arch,
        "device": preset.device,
        "cpu_features": list(preset.required_cpu_features()),
        "inputs": [i.to_json() for i in inputs],
        "outputs": [o.to_json() for o in outputs],
        "quantization": {"mode": config.quantize.value, **report.summary()},
        "passes": [pass_name(p) for p in passes],
        "kernels": kernels,
        "conv_algorithms": json.loads(str((mod.attrs or {}).get(CONV_ALGORITHMS_ATTR, "[]"))),
    }
    if quantize_report is not None:
        with open(quantize_report, "w") as handle:
            json.dump(report.to_json(), handle, indent=2)
    return Artifact(executable, manifest)


def run_passes(mod: tvm.IRModule, passes, dump_ir=None) -> tvm.IRModule:
    """Apply ``passes`` in order, writing the module after each one into ``dump_ir``."""
    if dump_ir is not None:
        os.makedirs(dump_ir, exist_ok=True)
        _dump(mod, os.path.join(dump_ir, "00_input.py"))
    for index, p in enumerate(passes, start=1):
        try:
            mod = p(mod)
        except TvmqError:
            raise  # bad user input (calibration data...) already has its one-line message
        except Exception as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            raise PipelineError(
                f"pass {pass_name(p)} failed: {type(err).__name__}: {first[:300]}; "
                f"try --disabled-pass {pass_name(p)} or report the model"
            ) from err
        if dump_ir is not None:
            safe = re.sub(r"[^A-Za-z0-9_]", "_", pass_name(p))
            _dump(mod, os.path.join(dump_ir, f"{index:02d}_{safe}.py"))
    return mod


def _dump(mod: tvm.IRModule, path: str) -> None:
    with open(path, "w") as handle:
        handle.write(mod.script(show_meta=False))


def describe_io(mod: tvm.IRModule) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Names, static shapes and dtypes of ``main``'s inputs and outputs."""
    main = mod["main"]
    attrs = main.attrs or {}
    params = list(main.params)
    num_input = int(attrs["num_input"]) if "num_input" in attrs else len(params)
    params = params[:num_input]
    input_names = list(attrs[INPUT_NAMES_ATTR]) if INPUT_NAMES_ATTR in attrs else []
    if len(input_names) != len(params):
        input_names = [p.name for p in params]
    inputs = [_tensor_info(str(n), p.ty) for n, p in zip(input_names, params, strict=True)]
    ret = main.ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    output_names = list(attrs[OUTPUT_NAMES_ATTR]) if OUTPUT_NAMES_ATTR in attrs else []
    if len(output_names) != len(fields):
        output_names = [f"output_{i}" for i in range(len(fields))]
    outputs = [_tensor_info(str(n), f) for n, f in zip(output_names, fields, strict=True)]
    return inputs, outputs


def _tensor_info(name: str, ty) -> TensorInfo:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise PipelineError(f"'{name}' is not a tensor of known shape; tvmq needs static shapes")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except TypeError:
        raise PipelineError(
            f"'{name}' has a symbolic shape {ty.shape}; pass --input-shapes for every input"
        ) from None
    return TensorInfo(name, shape, str(ty.dtype))
