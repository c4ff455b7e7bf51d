"""tvmq.pipeline: a list of passes that prints, drops, composes and dumps."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvmq
from tvmq.errors import ConfigError, PipelineError
from tvmq.pipeline import pass_name


def test_pipeline_is_a_list_of_passes():
    passes = tvmq.pipeline("x86")
    assert all(isinstance(p, tvm.transform.Pass) for p in passes)
    names = [pass_name(p) for p in passes]
    assert names.index("FoldBatchnormToConv2D") < names.index("LegalizeOps")
    assert names.index("FuseOps") < names.index("FuseTIR") < names.index("VMShapeLower")


def test_cuda_pipeline_has_gpu_schedules():
    names = [pass_name(p) for p in tvmq.pipeline("cuda-sm86")]
    assert "ApplyDefaultSchedule" in names


def test_disabled_pass_is_dropped():
    config = tvmq.CompileConfig(disabled_passes=("FoldBatchnormToConv2D",))
    names = [pass_name(p) for p in tvmq.pipeline("x86", config)]
    assert "FoldBatchnormToConv2D" not in names
    assert "LegalizeOps" in names


def test_unknown_disabled_pass():
    config = tvmq.CompileConfig(disabled_passes=("FuseEverything",))
    with pytest.raises(PipelineError, match=r"'FuseEverything' is not in this pipeline"):
        tvmq.pipeline("x86", config)


def test_unbuilt_quantize_mode_refused():
    with pytest.raises(ConfigError, match=r"--quantize mixed needs exactly one budget"):
        tvmq.CompileConfig(quantize="mixed")
    with pytest.raises(ConfigError, match=r"--size-budget 'lots' is not a budget"):
        tvmq.CompileConfig(quantize="mixed", size_budget="lots")
    with pytest.raises(ConfigError, match=r"--quantize 'int3' is not a mode"):
        tvmq.CompileConfig(quantize="int3")


def test_pipeline_runs_in_sequential_and_builds(tiny_model_path):
    mod = tvmq.load(tiny_model_path)
    preset = tvmq.targets.resolve("x86")
    with preset.tvm_target():
        lowered = tvm.transform.Sequential(tvmq.pipeline(preset))(mod)
    executable = tvm.compile(lowered, target=preset.tvm_target(), relax_pipeline=None)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(np.ones((1, 1, 8, 8), np.float32)))
    assert out.numpy().shape == (1, 3)


def test_batch_norm_is_folded(tiny_model_path):
    # At import, in numpy, where it follows a conv ...
    assert "batch_norm" not in tvmq.load(tiny_model_path).script()
    # ... and by the pipeline's FoldBatchnormToConv2D for modules from elsewhere.
    rng = np.random.default_rng(0)
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 6, 6), "float32"))
    params = [relax.const(rng.uniform(0.5, 1.5, 4).astype(np.float32)) for _ in range(4)]
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(rng.normal(size=(4, 2, 3, 3)).astype(np.float32))))
            norm = builder.emit(relax.op.nn.batch_norm(conv, *params, axis=1))
            out = builder.emit_output(relax.TupleGetItem(norm, 0))
        builder.emit_func_output(out)
    preset = tvmq.targets.resolve("x86")
    with preset.tvm_target():
        folded = tvm.transform.Sequential(tvmq.pipeline(preset)[:4])(builder.get())
    text = folded.script()
    assert "batch_norm" not in text
    assert "R.nn.conv2d" in text


def test_user_pass_inserted(tiny_model_path):
    seen = []

    @tvm.transform.module_pass(opt_level=0, name="CountFunctions")
    def count(mod, _ctx):
        seen.append(len(mod.functions))
        return mod

    passes = tvmq.pipeline("x86")
    passes.insert(4, count)
    with tvmq.targets.resolve("x86").tvm_target():
        tvm.transform.Sequential(passes)(tvmq.load(tiny_model_path))
    assert seen == [1]


def test_dump_ir_writes_module_after_each_pass(tiny_model_path, tmp_path):
    tvmq.compile(tiny_model_path, target="x86", dump_ir=tmp_path / "ir")
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    names = [pass_name(p) for p in tvmq.pipeline("x86")]
    assert len(files) == len(names) + 1
    assert files[0] == "00_input.py"
    assert files[1] == "01_FoldBatchnormToConv2D.py"
    assert "R.nn.conv2d" in (tmp_path / "ir" / files[0]).read_text()
