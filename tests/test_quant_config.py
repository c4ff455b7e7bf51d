"""QConfig validation and calibration-data checks: every bad input has a clear message."""

import numpy as np
import pytest

from tvmq.calibration_data import load_calibration_data
from tvmq.errors import CalibrationError, ConfigError
from tvmq.frontend import TensorInfo
from tvmq.qconfig import (
    ActivationScheme,
    CalibrationMethod,
    Granularity,
    LayerOverride,
    QConfig,
)

INPUTS = [TensorInfo("input", (1, 1, 4, 4), "float32")]


def test_qconfig_defaults_and_strings():
    config = QConfig(calibration="kl", weight_granularity="per_tensor")
    assert config.calibration is CalibrationMethod.KL
    assert config.weight_granularity is Granularity.PER_TENSOR
    assert config.activation_scheme is ActivationScheme.ASYMMETRIC
    assert QConfig().weight_granularity is Granularity.PER_CHANNEL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 9}, r"weight_bits=9 is not valid; use an integer from 2 to 8"),
        ({"weight_bits": True}, r"weight_bits=True is not valid"),
        ({"activation_bits": 6}, r"activation_bits=6 is not supported; use 8 or 4"),
        ({"calibration": "entropy"}, r"calibration 'entropy' is not valid; choose one of: "
                                     r"minmax, percentile, kl, mse"),
        ({"weight_granularity": "per_row"}, r"weight_granularity 'per_row' is not valid"),
        ({"activation_scheme": "signed"}, r"activation_scheme 'signed' is not valid"),
        ({"percentile": 30}, r"percentile=30 is not valid; use a number in \(50, 100\]"),
        ({"percentile": float("nan")}, r"percentile=nan is not valid"),
        ({"skip": "softmax"}, r"skip='softmax' is a string; pass a tuple of names"),
        ({"skip": ("",)}, r"skip entry '' is not a layer or op name"),
        ({"overrides": {"conv2d_0": 4}}, r"overrides entry 'conv2d_0': 4 is not a layer name "
                                         r"mapped to a LayerOverride"),
    ],
)
def test_qconfig_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QConfig(**kwargs)


def test_layer_override_rejects_bad_bits():
    with pytest.raises(ConfigError, match=r"override weight_bits=1 is not valid"):
        LayerOverride(weight_bits=1)


def test_skip_and_overrides_match_names_and_globs():
    config = QConfig(
        skip=("nn.softmax", "conv2d_3"),
        overrides={"matmul_*": LayerOverride(weight_bits=4, weight_granularity="per_tensor")},
    )
    assert config.skips("softmax_0", "nn.softmax")
    assert config.skips("conv2d_3", "nn.conv2d")
    assert not config.skips("conv2d_1", "nn.conv2d")
    assert config.for_layer("matmul_0")[:2] == (4, Granularity.PER_TENSOR)
    assert config.for_layer("conv2d_0")[:2] == (8, Granularity.PER_CHANNEL)


def _samples(n=3, **overrides):
    data = {"input": np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)}
    data.update(overrides)
    return data


def test_npz_cut_into_runs(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, **_samples(3))
    data = load_calibration_data(str(path), INPUTS)
    assert len(data) == 3
    assert all(run["input"].shape == (1, 1, 4, 4) for run in data)


def test_directory_of_npz_and_npy(tmp_path):
    np.savez(tmp_path / "a.npz", **_samples(2))
    np.save(tmp_path / "b.npy", _samples(1)["input"][0])  # one sample, no sample axis
    assert len(load_calibration_data(str(tmp_path), INPUTS)) == 3


def test_iterable_of_dicts():
    feeds = [{"input": np.zeros((1, 1, 4, 4), np.float32)} for _ in range(2)]
    assert len(load_calibration_data(iter(feeds), INPUTS)) == 2


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"input": np.zeros((0, 1, 4, 4), np.float32)}, r"has no samples; give at least one"),
        (_samples(2, extra=np.zeros((2, 3), np.float32)),
         r"has an array 'extra' but the model's inputs are: input"),
        ({"images": np.zeros((2, 1, 4, 4), np.float32)},
         r"has an array 'images' but the model's inputs are: input"),
        ({"input": np.zeros((2, 1, 4, 5), np.float32)},
         r"calibration input 'input' has shape \(2, 1, 4, 5\) but the model wants "
         r"\(samples, 1, 4, 4\)"),
        ({"input": np.zeros((2, 1, 4, 4), np.float64)},
         r"calibration input 'input' has dtype float64 but the model wants float32; "
         r"convert it with .astype\('float32'\)"),
    ],
)
def test_npz_errors(tmp_path, source, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **source)
    with pytest.raises(CalibrationError, match=message):
        load_calibration_data(str(path), INPUTS)


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_name_the_sample(tmp_path, value, kind):
    data = _samples(5)
    data["input"][3, 0, 1, 2] = value
    path = tmp_path / "bad.npz"
    np.savez(path, **data)
    with pytest.raises(CalibrationError, match=rf"input 'input' sample 3 contains {kind}"):
        load_calibration_data(str(path), INPUTS)


def test_missing_input_and_file_errors(tmp_path):
    two = [*INPUTS, TensorInfo("mask", (1, 4), "float32")]
    path = tmp_path / "calib.npz"
    np.savez(path, **_samples(2))
    with pytest.raises(CalibrationError, match=r"has no array for input 'mask'"):
        load_calibration_data(str(path), two)
    with pytest.raises(CalibrationError, match=r"'.*nope.npz' does not exist; check the path"):
        load_calibration_data(str(tmp_path / "nope.npz"), INPUTS)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CalibrationError, match=r"is not an .npz file"):
        load_calibration_data(str(tmp_path / "x.txt"), INPUTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match=r"has no .npz or .npy files"):
        load_calibration_data(str(empty), INPUTS)


def test_iterable_errors():
    with pytest.raises(CalibrationError, match=r"calibration data is empty"):
        load_calibration_data([], INPUTS)
    bad = [{"input": np.zeros((1, 1, 4, 4), np.float32)}, {"input": np.zeros((2, 2))}]
    with pytest.raises(CalibrationError, match=r"'input' of item 1 has shape \(2, 2\)"):
        load_calibration_data(bad, INPUTS)
    nan = np.zeros((1, 1, 4, 4), np.float32)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"input 'input' sample 2 contains NaN"):
        load_calibration_data([{"input": np.zeros((1, 1, 4, 4), np.float32)}] * 2
                              + [{"input": nan}], INPUTS)
    with pytest.raises(CalibrationError, match=r"calibration item 0 is a list"):
        load_calibration_data([[1, 2]], INPUTS)
    with pytest.raises(CalibrationError, match=r"of type int is not usable"):
        load_calibration_data(3, INPUTS)
