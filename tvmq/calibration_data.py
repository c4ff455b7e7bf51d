"""Calibration data: read it, check it against the model's inputs, cut it into model runs.

Three forms are accepted:

- an ``.npz`` whose arrays are named after the model inputs, first axis = samples;
- a directory of such ``.npz`` files, or of ``.npy`` files (single-input models: each
  holds samples along its first axis, or one sample), read in file-name order;
- a Python iterable of dicts, each one model run: input name -> array of the input's shape.

Everything is checked before the model runs, and every message names the input and, for a
bad value, the sample index.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationError
from .frontend import TensorInfo

CalibrationSource = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CalibrationSet:
    """Checked calibration data, as the feeds of one model run each."""

    batches: tuple[dict[str, np.ndarray], ...]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def load_calibration_data(
    source: CalibrationSource | CalibrationSet, inputs: Sequence[TensorInfo]
) -> CalibrationSet:
    """Read ``source`` and check it against ``inputs``; see the module docstring.

    Raises
    ------
    CalibrationError
        For a missing file, unknown or missing input names, a wrong shape or dtype,
        NaN or Inf values, or no samples at all.
    """
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        samples = _read_directory(path, inputs) if os.path.isdir(path) else _read_npz(path)
        return _from_samples(samples, inputs, path)
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise CalibrationError(
            f"calibration data of type {type(source).__name__} is not usable; pass an .npz "
            "path, a directory of .npz/.npy files or an iterable of {input name: array} dicts"
        )
    return _from_feeds(source, inputs)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise CalibrationError(f"calibration data '{path}' does not exist; check the path")
    if not path.endswith(".npz"):
        raise CalibrationError(
            f"calibration data '{path}' is not an .npz file; save it with numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError) as err:
        raise CalibrationError(
            f"calibration data '{path}' is not a readable .npz ({type(err).__name__}); "
            "save it with numpy.savez"
        ) from None


def _read_directory(path: str, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    files = sorted(f for f in os.listdir(path) if f.endswith((".npz", ".npy")))
    if not files:
        raise CalibrationError(
            f"calibration directory '{path}' has no .npz or .npy files; add some"
        )
    chunks: list[dict[str, np.ndarray]] = []
    for name in files:
        full = os.path.join(path, name)
        if name.endswith(".npz"):
            chunks.append(_read_npz(full))
            continue
        if len(inputs) != 1:
            raise CalibrationError(
                f"calibration file '{full}' is a .npy but the model has {len(inputs)} inputs; "
                "use .npz files with one array per input"
            )
        try:
            array = np.load(full, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CalibrationError(
                f"calibration file '{full}' is not a readable .npy ({type(err).__name__})"
            ) from None
        if array.ndim == len(inputs[0].shape) - 1:
            array = array[None]  # one sample
        chunks.append({inputs[0].name: array})
    merged = {}
    for info in inputs:
        parts = [chunk[info.name] for chunk in chunks if info.name in chunk]
        if parts and all(p.shape[1:] == parts[0].shape[1:] for p in parts):
            merged[info.name] = np.concatenate(parts)
        elif parts:
            merged[info.name] = parts[0]  # the shape check below names the mismatch
    for chunk in chunks:
        for name in chunk:
            merged.setdefault(name, chunk[name])
    return merged


def _from_samples(
    arrays: dict[str, np.ndarray], inputs: Sequence[TensorInfo], source: str
) -> CalibrationSet:
    _check_names(arrays, inputs, f"calibration data '{source}'")
    counts = set()
    for info in inputs:
        array = np.asarray(arrays[info.name])
        want = info.shape[1:]
        if array.ndim != len(info.shape) or tuple(array.shape[1:]) != want:
            raise CalibrationError(
                f"calibration input '{info.name}' has shape {tuple(array.shape)} but the model "
                f"wants (samples, {', '.join(str(d) for d in want)}); the first axis holds "
                "samples"
            )
        _check_dtype(array, info)
        counts.add(array.shape[0])
    if len(counts) > 1:
        listed = ", ".join(f"'{i.name}': {arrays[i.name].shape[0]}" for i in inputs)
        raise CalibrationError(
            f"calibration inputs have different sample counts ({listed}); give each input "
            "the same number"
        )
    count = counts.pop()
    if count == 0:
        raise CalibrationError(f"calibration data '{source}' has no samples; give at least one")
    batch = inputs[0].shape[0] if inputs[0].shape else 1
    if count < batch:
        raise CalibrationError(
            f"calibration data '{source}' has {count} samples but the model's batch is {batch}; "
            f"give at least {batch}"
        )
    for info in inputs:
        _check_finite(np.asarray(arrays[info.name]), info.name, 0)
    runs = tuple(
        {i.name: np.ascontiguousarray(arrays[i.name][start : start + batch]) for i in inputs}
        for start in range(0, count - batch + 1, batch)
    )
    return CalibrationSet(runs)


def _from_feeds(
    feeds: Iterable[Mapping[str, np.ndarray]], inputs: Sequence[TensorInfo]
) -> CalibrationSet:
    runs = []
    for index, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise CalibrationError(
                f"calibration item {index} is a {type(feed).__name__}, not a dict of input "
                "name -> array"
            )
        _check_names(feed, inputs, f"calibration item {index}")
        run = {}
        for info in inputs:
            array = np.asarray(feed[info.name])
            if tuple(array.shape) != info.shape:
                raise CalibrationError(
                    f"calibration input '{info.name}' of item {index} has shape "
                    f"{tuple(array.shape)} but the model wants {info.shape}"
                )
            _check_dtype(array, info)
            _check_finite(array, info.name, index * max(info.shape[:1] or (1,)))
            run[info.name] = np.ascontiguousarray(array)
        runs.append(run)
    if not runs:
        raise CalibrationError("calibration data is empty; give at least one sample")
    return CalibrationSet(tuple(runs))


def _check_names(arrays: Mapping[str, object], inputs: Sequence[TensorInfo], what: str) -> None:
    names = [i.name for i in inputs]
    for name in arrays:
        if name not in names:
            raise CalibrationError(
                f"{what} has an array '{name}' but the model's inputs are: {', '.join(names)}; "
                "name the arrays after the inputs"
            )
    for name in names:
        if name not in arrays:
            raise CalibrationError(
                f"{what} has no array for input '{name}'; the model needs: {', '.join(names)}"
            )


def _check_dtype(array: np.ndarray, info: TensorInfo) -> None:
    if array.dtype != np.dtype(info.dtype):
        raise CalibrationError(
            f"calibration input '{info.name}' has dtype {array.dtype} but the model wants "
            f"{info.dtype}; convert it with .astype('{info.dtype}')"
        )


def _check_finite(array: np.ndarray, name: str, first_sample: int) -> None:
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1))
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        row = int(rows[0])
        value = array.reshape(array.shape[0] if array.ndim else 1, -1)[row][bad[row]][0]
        kind = "NaN" if np.isnan(value) else "Inf"
        raise CalibrationError(
            f"calibration input '{name}' sample {first_sample + row} contains {kind}; "
            "remove or fix that sample"
        )
