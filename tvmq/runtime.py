"""Load an artifact and run it: numpy in, numpy out.

Loading runs the artifact's compiled code, so load only artifacts you trust. Before any
code is loaded the manifest is checked: format and versions, the CPU architecture and
features the code needs, and the GPU it runs on. Inputs are checked against the manifest
before they reach TVM.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .artifact import LIBRARY, check_members, read_manifest
from .errors import ArtifactError, InputError
from .frontend import TensorInfo, random_inputs
from .targets.preset import host_cpu_features


@dataclass(frozen=True)
class BenchmarkResult:
    """End-to-end latency over ``repeat`` measurements of ``number`` runs each."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    repeat: int
    number: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Model:
    """A loaded artifact. Create with :func:`load`."""

    def __init__(self, manifest: dict[str, Any], library_path: str) -> None:
        import tvm
        from tvm import relax

        self.manifest = manifest
        self.inputs = [TensorInfo.from_json(i) for i in manifest["inputs"]]
        self.outputs = [TensorInfo.from_json(o) for o in manifest["outputs"]]
        self.device = tvm.cuda(0) if manifest["device"] == "cuda" else tvm.cpu(0)
        self.library = tvm.runtime.load_module(library_path)
        self.vm = relax.VirtualMachine(self.library, self.device)

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model once; returns the outputs by name."""
        result = self.vm["main"](*self._to_device(inputs))
        return self._from_device(result)

    def benchmark(
        self,
        *,
        repeat: int = 20,
        number: int = 5,
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> BenchmarkResult:
        """Time ``main``: ``repeat`` measurements, each the mean of ``number`` runs."""
        if repeat < 1 or number < 1:
            raise InputError(f"repeat ({repeat}) and number ({number}) must be at least 1")
        self.set_inputs(dict(inputs) if inputs else random_inputs(self.inputs))
        timer = self.vm.time_evaluator(
            "invoke_stateful", self.device, number=number, repeat=repeat
        )
        times = [t * 1e3 for t in timer("main").results]
        return BenchmarkResult(
            median_ms=statistics.median(times),
            mean_ms=statistics.fmean(times),
            min_ms=min(times),
            max_ms=max(times),
            std_ms=statistics.pstdev(times),
            repeat=repeat,
            number=number,
        )

    def set_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Bind ``inputs`` to ``main`` for ``vm.invoke_stateful("main")`` (repeated runs)."""
        self.vm.set_input("main", *self._to_device(inputs))

    def _to_device(self, inputs: Mapping[str, np.ndarray]) -> list:
        import tvm

        check_inputs(self.inputs, inputs)
        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[i.name]), self.device)
                for i in self.inputs]

    def _from_device(self, result) -> dict[str, np.ndarray]:
        values = list(result) if len(self.outputs) > 1 else [result]
        return {info.name: v.numpy() for info, v in zip(self.outputs, values, strict=True)}


def check_inputs(expected: list[TensorInfo], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise ``InputError`` unless ``inputs`` match ``expected`` by name, shape and dtype."""
    names = [i.name for i in expected]
    for name in inputs:
        if name not in names:
            raise InputError(f"the model has no input '{name}'; its inputs are: {', '.join(names)}")
    for info in expected:
        if info.name not in inputs:
            raise InputError(f"input '{info.name}' is missing; the model needs: {', '.join(names)}")
        value = np.asarray(inputs[info.name])
        if tuple(value.shape) != info.shape:
            dims = "x".join(str(d) for d in value.shape)
            raise InputError(
                f"input '{info.name}' has shape {tuple(value.shape)} but the model wants "
                f"{info.shape}; recompile with --input-shapes {info.name}:{dims} or reshape it"
            )
        if value.dtype != np.dtype(info.dtype):
            raise InputError(
                f"input '{info.name}' has dtype {value.dtype} but the model wants {info.dtype}; "
                f"convert it with .astype('{info.dtype}')"
            )


def load(path: str | os.PathLike) -> Model:
    """Load an artifact written by ``Artifact.export``.

    This runs the artifact's compiled code: load only artifacts you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact '{path}' does not exist; build one with tvmq compile")
    if not tarfile.is_tarfile(path):
        raise ArtifactError(f"'{path}' is not a tvmq artifact (not a tar file)")
    work = tempfile.mkdtemp(prefix="tvmq-artifact-")
    try:
        with tarfile.open(path) as tar:
            check_members(tar, path)
            manifest = read_manifest(tar, path)
            check_host(manifest, path)
            try:
                library = tar.extractfile(tar.getmember(LIBRARY))
            except KeyError:
                raise ArtifactError(f"'{path}' has no {LIBRARY}; rebuild it") from None
            library_path = os.path.join(work, LIBRARY)
            with open(library_path, "wb") as out:
                shutil.copyfileobj(library, out)
        return Model(manifest, library_path)
    finally:
        # The library is mapped into the process once loaded; its file is no longer needed.
        shutil.rmtree(work, ignore_errors=True)


def check_host(manifest: Mapping[str, Any], source: str) -> None:
    """Raise ``ArtifactError`` unless this machine can run the artifact's code."""
    preset = manifest.get("target", {}).get("preset", "?")
    arch = manifest.get("arch")
    machine = platform.machine()
    if arch != machine:
        raise ArtifactError(
            f"'{source}' was built for {arch} (target {preset}) but this machine is {machine}; "
            f"run it on an {arch} machine"
            + (", or under qemu with tvmq run --emulate" if arch == "aarch64" else "")
            + ", or recompile with --target x86"
        )
    missing = sorted(set(manifest.get("cpu_features", [])) - host_cpu_features())
    if missing:
        raise ArtifactError(
            f"'{source}' was built for target {preset}, which needs CPU features this CPU lacks "
            f"({', '.join(missing)}); recompile with --target x86 for this machine"
        )
    if manifest.get("device") == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise ArtifactError(
                f"'{source}' was built for an NVIDIA GPU (target {preset}) and no CUDA GPU is "
                "visible here; run it on a machine with one"
            )
